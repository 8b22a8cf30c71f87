"""The one thread an engine's model runs on: loading, calibration and every step.

Model steps run off the event loop so tokens keep streaming (torch releases the GIL inside its
kernels). They run on ONE dedicated thread, not on the loop's shared pool of worker threads:

- On CPU, every thread that starts a torch parallel region gets its own OpenMP worker pool,
  and once the pools hold more threads than there are CPUs, libgomp slows every parallel region
  down (`medha.model.openmp`). A shared pool may hand steps to a second thread whenever two
  calls overlap; a dedicated thread keeps one pool for the model, and before each call the
  loop's own idle pool is released.
- Calibration runs on the thread the steps will run on, so it times them as they will run.
- On CUDA the current device is per thread: set once, it holds for every step.

A call waits for its work even when the caller is cancelled (the cancellation is raised once the
work is done): a step half-written into the KV cache must not overlap with the next one.
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
        self.ident: int | None = None
        """The thread's id, once it has run a call."""

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the model thread, from a coroutine on the event loop."""
        release_idle_threads()  # the loop thread's pool, if it has one
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args)
        with anyio.CancelScope(shield=True):
            await asyncio.wait([future])
        await anyio.lowlevel.checkpoint_if_cancelled()
        return future.result()

    def _call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        self.ident = threading.get_ident()
        return fn(*args)

    def close(self) -> None:
        """Let the thread end once its current call (if any) returns; idempotent."""
        self._executor.shutdown(wait=False, cancel_futures=True)
