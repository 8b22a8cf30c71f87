"""Releasing a thread's idle OpenMP workers, so that the thread which runs the model keeps fast
parallel regions.

torch runs the parallel regions of its CPU kernels on OpenMP, and GNU libgomp (the runtime of
the Linux torch wheels) keeps a pool of worker threads for every thread that has started a
parallel region. While the pools of all threads together hold more threads than the process
may use CPUs, libgomp throttles: a waiting worker spins 1,000 times instead of 300,000 before
it sleeps on a futex, so every parallel region then pays a futex wake-up per worker.

An engine runs its model on a thread of its own (`medha.actors.model_thread`), and the event
loop runs on another. Once the loop's thread has run a single parallel torch op (a notebook
cell, a web app's preprocessing), both pools exist and the model thread is throttled. Measured
on the 2-core development machine with OMP_NUM_THREADS=2 and SmolLM2-135M in bf16: elementwise
ops on the model thread took 3-7x longer (torch.cat of two 96x3072 tensors: 19 us -> 60-130 us),
a 96-token prefill step 105-115 ms -> 150-170 ms, and eight concurrent requests 1.3-1.5x longer.

The OpenMP 5.0 call `omp_pause_resource_all(omp_pause_soft)` frees the pool of the thread that
calls it (libgomp: `gomp_pause_host`): its idle workers exit, and the next parallel region on
that thread builds a new pool. It is made on every libgomp the process has loaded, since a
library may bring its own copy, with pools of its own. The engine calls `release_idle_threads`
on the loop's thread before each step, so that only the model thread's pool is left while the
step runs.

Only libgomp is released, whose call frees the calling thread's pool alone (read from its
source, libgomp/team.c). The LLVM and Intel runtimes pause the whole runtime, which would be
unsafe while another engine's model thread is inside a parallel region; they do not throttle
this way either (their idle workers spin for KMP_BLOCKTIME).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401  (loads the OpenMP runtime torch uses)

_OMP_PAUSE_SOFT = 1
"""omp_pause_resource_t's omp_pause_soft (OpenMP 5.0)."""


def release_idle_threads() -> bool:
    """Free the calling thread's idle OpenMP worker pools (libgomp only); True if a runtime was
    asked to. Harmless anywhere: without a pool it does nothing, and a later parallel region on
    this thread starts a new pool. Must not be called inside a parallel region (it cannot be
    from Python: the region's thread is busy in torch)."""
    pauses = _libgomp_pauses()
    for pause in pauses:
        pause(_OMP_PAUSE_SOFT)
    return bool(pauses)


@functools.cache
def _libgomp_pauses() -> tuple[Callable[[int], int], ...]:
    """`omp_pause_resource_all` of every libgomp this process has loaded (torch's, and any
    other copy a library brought: each keeps its own pools); empty where there is none (not
    Linux, or a libgomp older than GCC 9). Read once: torch's is loaded when this module is."""
    pauses: list[Callable[[int], int]] = []
    for path in _loaded_libgomp():
        try:
            # RTLD_NOLOAD: the handle of the copy already loaded, never a new one.
            library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        pause = getattr(library, "omp_pause_resource_all", None)
        if pause is not None:
            pause.argtypes = [ctypes.c_int]
            pause.restype = ctypes.c_int
            pauses.append(pause)
    return tuple(pauses)


def _loaded_libgomp() -> list[Path]:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    found: list[Path] = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libgomp"):
            path = Path(fields[5])
            if path not in found:
                found.append(path)
    return found
