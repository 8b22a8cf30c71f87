"""SchedulerStats: a snapshot of the scheduler's queues, KV memory and pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    waiting: int
    """Queued, never started."""
    preempted: int
    """Queued again after an eviction, waiting to recompute."""
    prefilling: int
    decoding: int
    free_blocks: tuple[int, ...]
    """Free KV blocks per KVP group."""
    total_blocks: tuple[int, ...]
    plans_in_flight: int
    stage0_busy: bool
    finished: int
    aborted: int
    preemptions: int
    """Evictions so far (a request evicted twice counts twice)."""
    cached_blocks: tuple[int, ...] = ()
    """Blocks in the prefix cache per KVP group (in use or not; the unused ones count as free)."""
    prefix_hit_blocks: int = 0
    """Blocks requests took from the prefix cache instead of computing them, so far."""

    @property
    def running(self) -> int:
        return self.prefilling + self.decoding

    @property
    def queued(self) -> int:
        return self.waiting + self.preempted
