"""Where an engine's actors run: a task of their own on the caller's event loop.

An anyio task group entered in the caller's task would put the caller's own code inside the
group's cancel scope until the engine stops. Stopping it from another task (a web app's
shutdown hook, a supervisor) would then cancel the caller mid-await, and two engines would have
to stop in the reverse order of starting. So a separate task owns the group, and stopping
cancels that task only; the caller's pending calls end with EngineClosedError, delivered by the
actors as they stop.

asyncio only (the engine's threads hand results to its loop with call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import anyio

from medha.log import get_logger

_log = get_logger(__name__)

ActorLoop = Callable[[], Awaitable[None]]


class ActorHost:
    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    async def start(self, loops: Sequence[ActorLoop]) -> None:
        """Start `loops` (each must contain its own errors) in the host task; returns once
        they run."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} was started already")
        running = anyio.Event()

        async def host() -> None:
            async with anyio.create_task_group() as group:
                for loop in loops:
                    group.start_soon(loop)
                running.set()
                await anyio.sleep_forever()

        task = self._task = asyncio.get_running_loop().create_task(host(), name=self.name)
        waiter = asyncio.ensure_future(running.wait())
        try:
            await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()  # the caller was cancelled while starting: leave nothing running
            raise
        finally:
            waiter.cancel()
        if not running.is_set():
            task.result()  # the host ended before its loops ran: raise why

    async def stop(self) -> None:
        """Cancel the host task and wait until every loop has ended; idempotent."""
        task = self._task
        if task is None:
            return
        task.cancel()
        # asyncio.wait, unlike awaiting the task, does not raise the host's cancellation here;
        # a cancellation of the caller still propagates.
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            _log.warning("actors ended with an error", host=self.name, error=repr(task.exception()))
