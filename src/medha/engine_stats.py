"""EngineStats: a snapshot of an engine's queues, KV memory and counters (`Engine.stats()`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from medha.actors.scheduler_actor import SchedulerActor

T = TypeVar("T")

CROSS_THREAD_TIMEOUT_S = 5.0
"""How long `on_loop` waits for a busy event loop before TimeoutError."""


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


def on_loop(loop: asyncio.AbstractEventLoop | None, take: Callable[[], T]) -> T:
    """`take()` on `loop`'s thread: at once when called there (or with no loop yet), else as a
    callback of the loop, waited for. The scheduler's tables change on that thread only, so a
    snapshot read from another one (a Prometheus scrape thread, an `LLM` user) could see them
    half changed, or fail with "dictionary changed size during iteration"."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if loop is None or here is loop or not loop.is_running():
        return take()  # nothing changes the tables meanwhile
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(take())
            except BaseException as exc:
                future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout=CROSS_THREAD_TIMEOUT_S)
    except TimeoutError:
        future.cancel()  # the loop, when it gets to it, skips the work
        raise
