"""Start a multi-process engine's workers so that a cancelled start leaves none behind.

Starting the workers takes seconds and runs on a thread of its own (build_parallel_parts), which
a cancelled `Engine.start()` cannot stop. Whichever of the two comes second stops the workers:
the thread, if the start was abandoned before it finished, or `abandon()`, if it had finished.
"""

from __future__ import annotations

import threading

import anyio

from medha.config import EngineConfig
from medha.errors import EngineClosedError
from medha.parallel.engine_parts import ParallelParts, build_parallel_parts


class WorkerBuild:
    """One start's build of the worker processes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.done = threading.Event()
        """Set once the building thread is done, whether it built the workers or stopped them."""
        self._lock = threading.Lock()
        self._abandoned = False
        self._built: ParallelParts | None = None

    async def run(self) -> ParallelParts:
        """The started workers and what the engine needs of them (off the event loop)."""
        return await anyio.to_thread.run_sync(self._build, abandon_on_cancel=True)

    async def abandon(self) -> None:
        """The start failed or was cancelled: stop the workers if they were built already."""
        with self._lock:
            self._abandoned = True
            built, self._built = self._built, None
        if built is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(built.cluster.close)

    def _build(self) -> ParallelParts:
        try:
            parts = build_parallel_parts(self.config)
            with self._lock:
                if self._abandoned:
                    parts.cluster.close()
                    raise EngineClosedError("the engine's start was cancelled")
                self._built = parts
            return parts
        finally:
            self.done.set()
