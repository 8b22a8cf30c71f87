"""The one thread an engine's model runs on: loading, calibration and every step.

Model steps run off the event loop so tokens keep streaming (torch releases the GIL inside its
kernels). They run on ONE dedicated thread, not on the loop's shared pool of worker threads:

- On CPU, every thread that starts a torch parallel region gets its own OpenMP worker pool,
  and once the pools hold more threads than there are CPUs, libgomp slows every parallel region
  down (`medha.model.openmp`). A shared pool may hand steps to a second thread whenever two
  calls overlap; a dedicated thread keeps one pool for the model, and before each call the
  loop's own idle pool is released.
- Calibration runs on the thread the steps will run on, so it times them as they will run.
- On CUDA the current device is per thread: set once when the model loads
  (`build_engine_parts`), it holds for every step.

A call waits for its work even when the caller is cancelled, by anyio or by a plain asyncio
`task.cancel()` (a timeout around `Engine.start`, Ctrl-C in `asyncio.run`); the cancellation is
raised once the work is done. A caller that gave up on a model load must not find the memory
still taken, nor an abandoned step's error logged later as never retrieved.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio

from medha.model.openmp import release_idle_threads

T = TypeVar("T")


class ModelThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.thread: threading.Thread | None = None
        """The thread, once it has run a call."""

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the model thread, from a coroutine on the event loop."""
        release_idle_threads()  # the loop thread's pool, if it has one
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args)
        cancelled: asyncio.CancelledError | None = None
        # Shielded from anyio's cancellation, which would otherwise be re-delivered at every
        # await; a native one is caught and kept until the work is done.
        with anyio.CancelScope(shield=True):
            while not future.done():
                try:
                    await asyncio.wait([future])
                except asyncio.CancelledError as exc:
                    cancelled = exc
        if cancelled is not None:
            if not future.cancelled():
                future.exception()  # retrieved: the caller is gone, the cancellation says why
            raise cancelled
        await anyio.lowlevel.checkpoint_if_cancelled()
        return future.result()

    def _call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        self.thread = threading.current_thread()
        return fn(*args)

    def close(self) -> None:
        """Let the thread end once its current call (if any) returns; idempotent."""
        self._executor.shutdown(wait=False, cancel_futures=True)
