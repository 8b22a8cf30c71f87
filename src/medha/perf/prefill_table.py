"""Predicted prefill time of a prompt alone on an idle replica, as an O(log n) table lookup.

LARS asks for every waiting request's remaining prefill work every iteration, so the answer is
precomputed: the prompt is walked in chunks of a fixed reference size (cut at KVP shard
boundaries, as the scheduler cuts them), and the cumulative time is recorded at token counts on a
geometric grid plus every chunk boundary, then interpolated linearly (O(log n) per lookup).

With SPP a request's consecutive chunks stream through the pipeline: chunk i+1 enters stage 0
once chunk i has left it. So a prompt's time is the sum of its chunks' stage times plus the
pipeline drain, which for chunks with equal per-stage times is set by the slowest chunk:
    prefill(n) = sum_chunks stage_time + max_chunks (batch_time - stage_time).
With pp = 1 the drain is zero and this is the plain sum of batch times.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from medha.perf.replica import ReplicaSpec
from medha.scheduler.cost import SeqShape

ChunkTimes = Callable[[SeqShape], tuple[float, float]]
"""(batch_time, stage_time) of a batch holding only this chunk."""

MIN_TABLE_TOKENS = 8192


class PrefillTable:
    """Cumulative prefill time on a geometric token grid, extended on demand."""

    def __init__(
        self,
        chunk_times: ChunkTimes,
        replica: ReplicaSpec,
        chunk_tokens: int = 2048,
        grid_ratio: float = 2 ** (1 / 16),
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if grid_ratio <= 1:
            raise ValueError(f"grid_ratio must be > 1, got {grid_ratio}")
        self._chunk_times = chunk_times
        self._replica = replica
        self._chunk_tokens = chunk_tokens
        self._grid_ratio = grid_ratio
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

    def _lookup(self, tokens: int) -> tuple[float, float]:
        if tokens > self._tokens[-1]:
            self._extend(max(MIN_TABLE_TOKENS, 1 << (tokens - 1).bit_length()))
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
        while (last := self._tokens[-1]) < up_to:
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
                batch, stage = self._chunk_times(self._chunk(self._walk_pos, point))
                cum += stage
                drain = max(drain, batch - stage)
            self._tokens.append(point)
            self._cum_stage.append(cum)
            self._drain.append(drain)

    def _walk_full_chunks_to(self, point: int) -> None:
        while (end := self._next_chunk_end(self._walk_pos)) <= point:
            batch, stage = self._chunk_times(self._chunk(self._walk_pos, end))
            self._walk_cum += stage
            self._walk_drain = max(self._walk_drain, batch - stage)
            self._walk_pos = end

    def _next_chunk_end(self, pos: int) -> int:
        end = pos + self._chunk_tokens
        shard = self._replica.kvp_max_tokens_per_group
        if shard is not None and pos // shard + 1 < self._replica.kvp:
            # A chunk never straddles a KVP shard boundary (DESIGN section 8).
            end = min(end, (pos // shard + 1) * shard)
        return end

    def _chunk(self, start: int, end: int) -> SeqShape:
        return SeqShape(end - start, start, self._replica.kvp_groups_at(start))
