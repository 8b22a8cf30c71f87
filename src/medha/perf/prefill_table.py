"""Predicted prefill time of a prompt alone on an idle replica, as an O(log n) table lookup.

LARS asks for every waiting request's remaining prefill work every iteration, so the answer is
precomputed: the prompt is walked in chunks of a fixed reference size (cut at KVP shard
boundaries, as the scheduler cuts them), and the cumulative time is recorded at token counts on a
geometric grid plus every chunk boundary, then interpolated linearly (O(log n) per lookup).

With SPP a request's consecutive chunks stream through the pipeline: chunk i+1 enters stage 0
once chunk i has left it. So a prompt's time is the sum of its chunks' stage times plus the
pipeline drain, which for chunks with equal per-stage times is set by the slowest chunk:
    prefill(n) = sum_chunks stage_time + max_chunks (batch_time - stage_time).
With pp = 1 the drain is zero and this is the plain sum of batch times. Without SPP (pp > 1,
`ChunkBudget.pipelined` False) a chunk waits for the one before it to leave the last stage, so
the prompt's time is the sum of its chunks' batch times.

Chunk sizes. By default the walk uses a fixed reference chunk. Given a `ChunkBudget` (the engine
and the simulator pass their scheduler's), it cuts the prompt as adaptive chunking would with the
prompt alone: at each position the largest chunk whose batch time fits the iteration budget.
That is what "alone" means to LARS: while a request runs by itself, its predicted remaining work
must fall exactly as fast as time passes, or its slack would drain while it runs unhindered
(DESIGN section 4). Where small chunks cost more per token than the reference chunk (a CPU, where
each iteration re-reads the weights; the end of a long prompt, whose chunks shrink), a fixed
reference would under-predict the work and make every long request look late. Not modelled:
LARS's space sharing past `long_prefill_threshold`, which leaves part of a long prompt's budget
to others even when it runs alone (a lone 1M-token prompt then runs ~2% over its prediction);
and the finishing allowance (`SchedulerConfig.finish_tolerance`), which lets a prompt's last
chunk run over the budget: a prompt up to ~1.2 chunks long, which the scheduler prefills in one
iteration, is predicted as two (one iteration's fixed cost too dear; the table is cumulative
over positions, and where a prompt ends is not known to it).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

from medha.perf.replica import ReplicaSpec
from medha.scheduler.chunking import largest_fitting_chunk
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import SeqShape
from medha.scheduler.kvp import shard_sizes

ChunkTimes = Callable[[SeqShape], tuple[float, float]]
"""(batch_time, stage_time) of a batch holding only this chunk."""

MIN_TABLE_TOKENS = 8192


@dataclass(frozen=True)
class ChunkBudget:
    """The scheduler's chunking fields (see SchedulerConfig): a lone prompt's chunks are what
    its chunk search (`largest_fitting_chunk`) picks against a budget of `seconds`."""

    seconds: float
    min_chunk: int = 32
    max_chunk: int = 8192
    multiple: int = 32
    tolerance: float = 0.10
    pipelined: bool = True
    """A prompt's consecutive chunks overlap in the pipeline (SPP); False: each waits for the
    one before it to leave the last stage (SchedulerConfig.pipelined)."""

    @classmethod
    def of(cls, config: SchedulerConfig) -> ChunkBudget:
        """The budget `config`'s adaptive chunking works to."""
        return cls(
            config.target_batch_time,
            config.min_chunk,
            config.max_chunk,
            config.chunk_multiple,
            config.chunk_tolerance,
            # With one stage, stage and batch times are equal: either walk gives the same sums.
            config.pipelined or config.pp_stages == 1,
        )

    def scheduler_config(self) -> SchedulerConfig:
        """A SchedulerConfig with these chunking fields (it validates them)."""
        return SchedulerConfig(
            target_batch_time=self.seconds,
            min_chunk=self.min_chunk,
            max_chunk=self.max_chunk,
            chunk_multiple=self.multiple,
            chunk_tolerance=self.tolerance,
        )

    def __post_init__(self) -> None:
        self.scheduler_config()  # fail here, not at the first lookup


class PrefillTable:
    """Cumulative prefill time on a geometric token grid, extended on demand."""

    def __init__(
        self,
        chunk_times: ChunkTimes,
        replica: ReplicaSpec,
        chunk_tokens: int = 2048,
        grid_ratio: float = 2 ** (1 / 16),
        budget: ChunkBudget | None = None,
    ) -> None:
        """Chunks of `chunk_tokens`, or sized by `budget` when given."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if grid_ratio <= 1:
            raise ValueError(f"grid_ratio must be > 1, got {grid_ratio}")
        self._chunk_times = chunk_times
        self._replica = replica
        self._chunk_tokens = chunk_tokens
        self._grid_ratio = grid_ratio
        self._budget = budget
        self._budget_config = None if budget is None else budget.scheduler_config()
        self._budget_chunk_at = (-1, 0)
        """(position, chunk size) of the last budget search: the walk asks for it repeatedly."""
        self._tokens: list[int] = [0]
        self._cum_stage: list[float] = [0.0]
        self._drain: list[float] = [0.0]
        # The chunk walk: position of the next chunk boundary, stage time summed up to it, and
        # the largest drain among the chunks walked so far.
        self._walk_pos = 0
        self._walk_cum = 0.0
        self._walk_drain = 0.0

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    def prefill_time(self, prompt_tokens: int) -> float:
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        cum, drain = self._lookup(prompt_tokens)
        return cum + drain

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        if processed_tokens < 0 or prompt_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got processed={processed_tokens}, "
                f"prompt={prompt_tokens}"
            )
        if processed_tokens >= prompt_tokens:
            return 0.0
        cum_total, drain = self._lookup(prompt_tokens)
        cum_done, _ = self._lookup(processed_tokens)
        return cum_total - cum_done + drain

    def walk_toward(self, tokens: int, until: float) -> bool:
        """Extend the table so that looking `tokens` up walks nothing more, until
        `time.perf_counter()` passes `until` (at least one grid point per call). True once it
        is that far: a caller with a time budget walks a long table over several calls."""
        target = _extent_for(tokens)
        while self._tokens[-1] < target:
            self._add_point(target)
            if time.perf_counter() >= until:
                break
        return self._tokens[-1] >= target

    def _lookup(self, tokens: int) -> tuple[float, float]:
        if tokens > self._tokens[-1]:
            self._extend(_extent_for(tokens))
        i = bisect.bisect_left(self._tokens, tokens)
        if self._tokens[i] == tokens:
            return self._cum_stage[i], self._drain[i]
        lo, hi = self._tokens[i - 1], self._tokens[i]
        w = (tokens - lo) / (hi - lo)
        return (
            self._cum_stage[i - 1] + w * (self._cum_stage[i] - self._cum_stage[i - 1]),
            self._drain[i - 1] + w * (self._drain[i] - self._drain[i - 1]),
        )

    def _extend(self, up_to: int) -> None:
        while self._tokens[-1] < up_to:
            self._add_point(up_to)

    def _add_point(self, up_to: int) -> None:
        """Walk to the next grid point (at most `up_to`) and record it."""
        last = self._tokens[-1]
        # Grid points: geometric, plus every chunk boundary and the token after it, so that
        # interpolation never smooths over the jump a new chunk's fixed costs make.
        point = min(
            up_to,
            max(last + 1, round(last * self._grid_ratio)),
            self._next_chunk_end(self._walk_pos),
            self._walk_pos + 1 if self._walk_pos + 1 > last else up_to,
        )
        self._walk_full_chunks_to(point)
        cum, drain = self._walk_cum, self._walk_drain
        if self._walk_pos < point:
            occupied, chunk_drain = self._chunk_cost(self._walk_pos, point)
            cum += occupied
            drain = max(drain, chunk_drain)
        self._tokens.append(point)
        self._cum_stage.append(cum)
        self._drain.append(drain)

    def _walk_full_chunks_to(self, point: int) -> None:
        while (end := self._next_chunk_end(self._walk_pos)) <= point:
            occupied, chunk_drain = self._chunk_cost(self._walk_pos, end)
            self._walk_cum += occupied
            self._walk_drain = max(self._walk_drain, chunk_drain)
            self._walk_pos = end

    def _chunk_cost(self, start: int, end: int) -> tuple[float, float]:
        """(time the chunk holds up the next one, its pipeline drain) for tokens [start, end)."""
        batch, stage = self._times(start, end)
        if self._budget is not None and not self._budget.pipelined:
            return batch, 0.0
        return stage, batch - stage

    def _next_chunk_end(self, pos: int) -> int:
        end = pos + (self._chunk_tokens if self._budget is None else self._budget_chunk(pos))
        boundary = self._next_boundary(pos)
        return end if boundary is None else min(end, boundary)

    def _next_boundary(self, pos: int) -> int | None:
        """The next KVP shard boundary after `pos`, which no chunk straddles (DESIGN section 8),
        if a group is left to onboard."""
        shard = self._replica.kvp_max_tokens_per_group
        if shard is not None and pos // shard + 1 < self._replica.kvp:
            return (pos // shard + 1) * shard
        return None

    def _times(self, start: int, end: int) -> tuple[float, float]:
        """(batch_time, stage_time) of the chunk [start, end) alone: its slowest KVP group's,
        a full shard's or the appending group's, whichever costs more."""
        groups = self._replica.kvp_groups_at(start)
        shards = shard_sizes(start, groups, self._replica.kvp_max_tokens_per_group)
        times = [self._chunk_times(SeqShape(end - start, kv, groups)) for kv in set(shards)]
        return max(batch for batch, _ in times), max(stage for _, stage in times)

    def _budget_chunk(self, pos: int) -> int:
        """The chunk the scheduler's own search gives a prompt alone at `pos` with at least
        `max_chunk` tokens left (a shorter rest is one chunk whenever it fits, in both): like
        the scheduler, it searches up to the next KVP boundary at most."""
        cached_pos, cached = self._budget_chunk_at
        if cached_pos == pos:
            return cached
        config = self._budget_config
        assert config is not None
        boundary = self._next_boundary(pos)
        room = config.max_chunk if boundary is None else min(config.max_chunk, boundary - pos)
        choice = largest_fitting_chunk(
            lambda chunk: self._times(pos, pos + chunk)[0],
            room,
            config.target_batch_time,
            config,
        )
        chunk = config.min_chunk if choice is None else choice.tokens
        self._budget_chunk_at = (pos, chunk)
        return chunk


def _extent_for(tokens: int) -> int:
    """How far the table extends to answer for `tokens`: a power of two (so it doubles as it
    grows), at least MIN_TABLE_TOKENS."""
    return max(MIN_TABLE_TOKENS, 1 << (tokens - 1).bit_length())
