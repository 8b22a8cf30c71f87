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
re-price every request. Deadlines already promised do not move.

One observation moves the factor by at most `max_step` (2x by default): a single pathological
step (a first-call JIT, a page-cache miss) must not halve the next hundred chunks.
"""

from __future__ import annotations

import math
from typing import Protocol


class Rescalable(Protocol):
    time_scale: float
    """Factor applied to every predicted batch and stage time (1.0: as calibrated)."""


class OnlineTimeScale:
    """Learns `cost.time_scale` from (predicted, measured) seconds of finished iterations."""

    def __init__(
        self,
        cost: Rescalable,
        weight: float = 0.1,
        bounds: tuple[float, float] = (0.25, 4.0),
        max_step: float = 2.0,
    ) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        if not max_step > 1:
            raise ValueError(f"max_step must be > 1, got {max_step}")
        low, high = bounds
        if not 0 < low <= 1 <= high:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, got {bounds}")
        self.cost = cost
        self.weight = weight
        self._log_bounds = (math.log(low), math.log(high))
        self._max_log_step = math.log(max_step)
        self.observations = 0

    def observe(self, predicted: float, measured: float) -> None:
        """An iteration predicted (with the current factor) to take `predicted` seconds took
        `measured`. Non-positive or non-finite values carry no information and are ignored."""
        if not (predicted > 0 and measured > 0 and math.isfinite(predicted * measured)):
            return
        low, high = self._log_bounds
        step = self.weight * math.log(measured / predicted)
        step = min(max(step, -self._max_log_step), self._max_log_step)
        log_scale = math.log(self.cost.time_scale) + step
        self.cost.time_scale = math.exp(min(max(log_scale, low), high))
        self.observations += 1
