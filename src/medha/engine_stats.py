"""EngineStats: a snapshot of an engine's queues, KV memory and counters (`Engine.stats()`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.actors.scheduler_actor import SchedulerActor


@dataclass(frozen=True, slots=True)
class EngineStats:
    free_blocks: int
    total_blocks: int
    waiting: int
    running: int
    preempted: int
    finished: int
    aborted: int
    preemptions: int
    iterations: int
    time_scale: float = 1.0
    """Measured over calibrated iteration time (stage time with a pipeline), as learned online
    (1.0 when off)."""
    context_scale: float = 1.0
    """The context-dependent terms' (attention, KV reads) factor on top of `time_scale`."""
    pauses: int = 0
    """Times an iteration stopped between layers for a newer request that ranked ahead of it
    (EngineConfig.pause_iterations)."""
    cached_blocks: int = 0
    """KV blocks in the prefix cache (EngineConfig.enable_prefix_caching), in use or not: the
    unused ones are part of `free_blocks`, evicted when needed."""
    prefix_cache_hit_tokens: int = 0
    """Prompt tokens taken from the prefix cache instead of computed, so far."""

    @classmethod
    def of(cls, actor: SchedulerActor) -> EngineStats:
        """The snapshot of an engine's scheduler actor, now."""
        s = actor.scheduler.stats()
        cost = None if actor.time_scale is None else actor.time_scale.cost
        return cls(
            free_blocks=sum(s.free_blocks),
            total_blocks=sum(s.total_blocks),
            waiting=s.waiting,
            running=s.prefilling + s.decoding,
            preempted=s.preempted,
            finished=s.finished,
            aborted=s.aborted,
            preemptions=s.preemptions,
            iterations=actor.iterations,
            time_scale=1.0 if cost is None else cost.time_scale,
            context_scale=1.0 if cost is None else cost.context_scale,
            pauses=actor.pauses,
            cached_blocks=sum(s.cached_blocks),
            prefix_cache_hit_tokens=s.prefix_hit_blocks * actor.scheduler.config.block_size,
        )
