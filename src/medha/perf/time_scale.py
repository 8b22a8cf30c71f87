"""Keeping a calibrated cost model level with the executor it predicts, while it runs.

Calibration fixes the model's shape (how an iteration's time grows with tokens, context and
sequences) at one moment. The executor's speed then drifts: on the shared 2-core development
machine the same SmolLM2 step took 99 ms, then 112 ms, then 128 ms within half an hour, and the
live engine's iterations ran a median 17-18% slower than predicted on the mixed_cpu workload.
The scheduler sizes chunks against those predictions, so every iteration overshot its budget.

`OnlineTimeScale` multiplies the model's batch and stage times by a factor it learns from
finished iterations: each one moves log(factor) a step of `weight` towards
log(measured / predicted), so a 2x overshoot and a 2x undershoot weigh alike and one outlier
moves the factor by at most `weight` of its log ratio. Replayed on that workload's iteration
trace, it brings the median |predicted - measured| / measured from 17% to 6%.

Batch times follow the factor at once. Predicted prefill times (LARS's work estimates) follow
it in steps of more than 10% (`RooflineCostModel.prefill_scale`): slack is only true if the
predicted work is on the level of the batches that do it, but each step makes the scheduler
re-price every request. A caller's deadline does not move; a default one (derived from the
predicted work) follows the new prediction until the request's first token (Scheduler._reprice).

One observation moves the factor by at most `max_step` (2x by default): a single pathological
step (a first-call JIT, a page-cache miss) must not halve the next hundred chunks.

A single factor keeps the level but not the shape. On that CPU the calibration under-predicted
small chunks over long prefixes and over-predicted prefill chunks with no prefix, so under one
factor the long document's attention-heavy iterations pushed it up and the short prompts' chunks,
priced too dear, were cut in two. So a second factor, `context_scale`, multiplies the terms that
grow with the KV context (attention, KV reads and gathers) against the rest. With
P = s * (R + c * A), an iteration's log error L = log(measured / P) moves log s by weight * L
and log c by gain * weight * L * (share - mean share), where share = c * A / P
(d log P / d log c) and the mean is a moving average over recent iterations. Centring the share
is what keeps the two apart: a uniform drift (every iteration slower, whatever its share) moves
only the level, and only an error that differs between iterations of more and less context
moves `c`. The centred share spans about +-0.3 where the level's regressor is 1, so `c` gets a
gain of 3. Replayed on the iteration traces of three bf16 mixed_cpu runs (150-160 iterations
each; scratch replays, not in the repository), against the level alone: median error 4.3% ->
2.7%, 4.2% -> 3.9% and 6.6% -> 6.7%; prefill-heavy iterations over-predicted by 6.5% -> 2.9%,
9.3% -> 5.6% and 8.3% -> 1.9%. Without centring the replays were as good, but a 1.3x drift
during an attention-heavy phase leaked ~13% into `c`.

A `context_scale` step makes the prefill table due for a new walk; with a
`PrefillTableRefresher` (the engine's), each observation walks it a slice further and installs
it once done (prefill_refresh.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from medha.scheduler.cost import SeqShape

if TYPE_CHECKING:
    from medha.perf.prefill_refresh import PrefillTableRefresher


class Rescalable(Protocol):
    time_scale: float
    """Factor applied to every predicted batch and stage time (1.0: as calibrated)."""
    context_scale: float
    """Factor on the context-dependent terms only, on top of `time_scale`."""

    def context_share(self, seqs: Sequence[SeqShape]) -> float:
        """The fraction of the batch's predicted time that `context_scale` multiplies."""


class OnlineTimeScale:
    """Learns `cost.time_scale` and `cost.context_scale` from (predicted, measured) seconds of
    finished iterations."""

    def __init__(
        self,
        cost: Rescalable,
        weight: float = 0.1,
        bounds: tuple[float, float] = (0.25, 4.0),
        max_step: float = 2.0,
        context_gain: float = 3.0,
        tables: PrefillTableRefresher | None = None,
    ) -> None:
        """`tables`: walks the prefill tables this learner's steps make due a slice per
        observation (None: the cost model re-walks a table at once, where the scale moved)."""
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        if not max_step > 1:
            raise ValueError(f"max_step must be > 1, got {max_step}")
        if not context_gain >= 0:
            raise ValueError(f"context_gain must be >= 0, got {context_gain}")
        low, high = bounds
        if not 0 < low <= 1 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got {bounds}")
        self.cost = cost
        self.tables = tables
        self.weight = weight
        self.context_gain = context_gain
        self._log_bounds = (math.log(low), math.log(high))
        self._max_log_step = math.log(max_step)
        self.observations = 0
        self.mean_share: float | None = None
        """Moving average of the context shares observed (None before the first)."""

    def observe(
        self, predicted: float, measured: float, context_share: float | None = None
    ) -> None:
        """An iteration predicted (with the current factors) to take `predicted` seconds took
        `measured`; `context_share` is the fraction of `predicted` that `context_scale`
        multiplies (RooflineCostModel.context_share; None learns the level only). Non-positive
        or non-finite times carry no information and are ignored."""
        self._learn(predicted, measured, context_share)
        if self.tables is not None:
            self.tables.poll()

    def _learn(self, predicted: float, measured: float, context_share: float | None) -> None:
        if not (predicted > 0 and measured > 0 and math.isfinite(predicted * measured)):
            return
        if context_share is not None and not 0.0 <= context_share <= 1.0:
            raise ValueError(f"context_share must be in [0, 1], got {context_share}")
        step = self.weight * math.log(measured / predicted)
        step = min(max(step, -self._max_log_step), self._max_log_step)
        self.cost.time_scale = self._moved(self.cost.time_scale, step)
        if context_share is not None:
            mean = context_share if self.mean_share is None else self.mean_share
            self.cost.context_scale = self._moved(
                self.cost.context_scale, self.context_gain * step * (context_share - mean)
            )
            self.mean_share = mean + self.weight * (context_share - mean)
        self.observations += 1

    def observe_batch(self, seqs: Sequence[SeqShape], predicted: float, measured: float) -> None:
        """`observe` for an iteration that ran `seqs`, with their context share (clamped to
        [0, 1] against rounding: it is a ratio of non-negative times)."""
        share = min(max(self.cost.context_share(seqs), 0.0), 1.0) if seqs else None
        self.observe(predicted, measured, share)

    def _moved(self, factor: float, log_step: float) -> float:
        low, high = self._log_bounds
        return math.exp(min(max(math.log(factor) + log_step, low), high))
