"""SchedulerStats: a snapshot of the scheduler's queues, KV memory and pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from medha.scheduler.request import RequestStatus

if TYPE_CHECKING:
    from medha.scheduler.table import RequestTable


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
    """Blocks requests took from the prefix cache instead of computing them, so far (at
    their first start: what their `cached_tokens` add up to)."""

    @classmethod
    def of(cls, table: RequestTable, plans_in_flight: int, stage0_busy: bool) -> SchedulerStats:
        """The snapshot of `table`'s queues and memory, with the pipeline's state."""
        queued = [request.status for request in table.queued.values()]
        running = [request.status for request in table.running.values()]
        return cls(
            waiting=queued.count(RequestStatus.WAITING),
            preempted=queued.count(RequestStatus.PREEMPTED),
            prefilling=running.count(RequestStatus.PREFILLING),
            decoding=running.count(RequestStatus.DECODING),
            free_blocks=table.pool.free_counts,
            total_blocks=table.pool.total_counts,
            plans_in_flight=plans_in_flight,
            stage0_busy=stage0_busy,
            finished=table.num_finished,
            aborted=table.num_aborted,
            preemptions=table.num_preemptions,
            cached_blocks=tuple(allocator.cache.num_cached for allocator in table.pool.groups),
            prefix_hit_blocks=table.prefix_hit_blocks,
        )

    @property
    def running(self) -> int:
        return self.prefilling + self.decoding

    @property
    def queued(self) -> int:
        return self.waiting + self.preempted
