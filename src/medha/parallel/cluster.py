"""The engine's side of the worker processes: launch, rendezvous, send steps, supervise, stop.

Launch: `world` processes from the multiprocessing spawn context (a fork would copy the caller's
event loop and threads). Both rendezvous (the RPC world of engine + workers, and the workers'
collective world) go through file:// stores in a private temporary folder, and TensorPipe and
gloo are pinned to the loopback interface: nothing listens beyond 127.0.0.1.

The engine joins the RPC world as rank 0 ("driver"): it talks to workers only by RPC; the data
(hidden states, all-reduces, KVP partials) moves between workers by collectives.

Blocking methods (`start`, `close`) run in a worker thread of the engine's event loop.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medha.errors import EngineFailedError
from medha.log import get_logger
from medha.parallel.layout import RankLayout
from medha.parallel.messages import ShardStep, StageDone, step_for_rank
from medha.parallel.worker import (
    ATTACHED_SESSION,
    WorkerSpec,
    configure_worker,
    driver_name,
    ping_worker,
    rpc_options,
    stop_worker,
    submit_step,
    worker_main,
    worker_name,
)

_log = get_logger(__name__)

# How often the engine checks that its workers are alive: spawned ones by their exit code,
# attached ones (on other machines) by a ping that must come back within _PING_TIMEOUT_S.
_SUPERVISE_PERIOD_S = 0.1
_PING_PERIOD_S = 1.0
_PING_TIMEOUT_S = 5.0


_live_cluster: Cluster | None = None
"""The cluster of this process's running multi-process engine (one at a time)."""
_live_cluster_lock = threading.Lock()


class WorkerStartError(EngineFailedError):
    """A worker process failed to start; the message carries its traceback."""


class Cluster:
    def __init__(
        self, spec_args: dict[str, Any], layout: RankLayout, attach: str | None = None
    ) -> None:
        self.layout = layout
        self.attach = attach
        """HOST:PORT where torchrun-started workers join (see docs/parallelism.md); None: spawn
        the workers on this machine."""
        self._spec_args = spec_args
        self._folder: Path | None = None
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._rpc_started = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._session = ""

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # -- start ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 300.0) -> None:
        """Spawn the workers (or wait for attached ones) until every one has loaded its shard,
        for at most `timeout_s`. On any failure the workers are stopped and the error (with the
        failing worker's traceback) raised."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout_s: float) -> None:
        global _live_cluster
        with _live_cluster_lock:
            if _live_cluster is not None:
                # torch's RPC world, the engine's control plane, is one per process: found
                # now, before any worker starts, not as "RPC is already initialized" later.
                raise WorkerStartError(
                    "one multi-process engine per Python process: another one is running "
                    "here (torch's RPC world is one per process); stop it first, or run the "
                    "second engine in a process of its own"
                )
            _live_cluster = self
        if self.attach is None:
            self._spawn(timeout_s)
        else:
            self._attach(timeout_s)

    def _spec(self, rpc_init: str, pg_init: str, threads: int, timeout_s: float) -> WorkerSpec:
        return WorkerSpec(
            **self._spec_args,
            layout=self.layout,
            rpc_init=rpc_init,
            pg_init=pg_init,
            session=self._session,
            threads=threads,
            timeout_s=timeout_s,
        )

    def _join_rpc(self, init_method: str, timeout_s: float) -> None:
        """Join the RPC world as rank 0; blocks until every worker joined."""
        import torch.distributed.rpc as rpc

        # torch prefixes the rendezvous keys with a per-process count of init_rpc calls; fresh
        # workers count from 0, so an engine that is not this process's first must too. Every
        # engine has its own store, so reusing the prefix is harmless.
        with rpc._init_counter_lock:
            rpc._init_counter = 0
        # Likewise torch numbers the start-up all-gathers per set of RPC names, and an attached
        # engine's names are the same every time: a second one in this process would wait for
        # a sequence number its fresh workers never send.
        with rpc.api._all_gather_dict_lock:
            rpc.api._all_gather_sequence_id.clear()
        with warnings.catch_warnings():
            # torch's RPC start-up makes a deprecated gloo call of its own (torch 2.13).
            warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
            rpc.init_rpc(
                driver_name(self._session),
                rank=0,
                world_size=self.world_size + 1,
                rpc_backend_options=rpc_options(init_method, timeout_s),
            )
        self._rpc_started = True

    def _spawn(self, timeout_s: float) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="medha-workers-"))
        self._session = secrets.token_hex(4)
        world = self.world_size
        spec = self._spec(
            rpc_init=f"file://{self._folder / 'rpc-store'}",
            pg_init=f"file://{self._folder / 'pg-store'}",
            threads=max(1, (os.cpu_count() or 1) // world),
            timeout_s=timeout_s,
        )
        context = multiprocessing.get_context("spawn")
        status = context.Queue()
        for rank in range(world):
            process = context.Process(
                target=worker_main, args=(rank, spec, status), name=f"medha-worker-{rank}"
            )
            process.daemon = True  # the interpreter's exit reaps them even if close() is skipped
            process.start()
            self.processes.append(process)

        rpc_error: list[BaseException] = []

        def join_rpc() -> None:
            try:
                # Spawned workers talk on loopback only, unless the user chose an interface.
                with _environ(
                    TP_SOCKET_IFNAME=os.environ.get("TP_SOCKET_IFNAME", "lo"),
                    GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                ):
                    self._join_rpc(spec.rpc_init, timeout_s)
            except BaseException as exc:
                rpc_error.append(exc)

        # The rendezvous blocks until every worker joined: wait for it beside the processes, so
        # a worker that dies early is reported instead of waited for.
        joiner = threading.Thread(target=join_rpc, name="rpc-rendezvous", daemon=True)
        joiner.start()
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        while len(ready) < world or joiner.is_alive():
            if rpc_error:
                break  # this side's rendezvous failed: the workers would wait for it in vain
            if time.monotonic() > deadline:
                raise WorkerStartError(f"workers did not start within {timeout_s:.0f} s")
            try:
                kind, rank, detail = status.get(timeout=0.1)
            except queue.Empty:
                self._raise_if_dead(status)
                continue
            if kind == "error":
                raise _start_error(rank, detail)
            ready.add(rank)
        if rpc_error:
            raise WorkerStartError(f"RPC rendezvous failed: {rpc_error[0]!r}") from rpc_error[0]
        _log.info("workers ready", world=world, layout=str(self.layout))

    def _raise_if_dead(self, status: Any) -> None:
        for rank, process in enumerate(self.processes):
            if process.exitcode is not None:
                # Its error report may still be in flight on the queue.
                with contextlib.suppress(queue.Empty):
                    kind, failed, detail = status.get(timeout=1.0)
                    if kind == "error":
                        raise _start_error(failed, detail)
                # Dead before it could report: in the spawn bootstrap, most often while
                # importing the caller's main module (its traceback is on stderr).
                raise WorkerStartError(
                    f"worker {rank} exited with code {process.exitcode} during start-up, "
                    "before it could report why (see its traceback on stderr). Workers import "
                    "your main module: a script that starts the engine at import time must "
                    'do so under `if __name__ == "__main__":`'
                )

    def _attach(self, timeout_s: float) -> None:
        """Wait for `world` workers started by torchrun (`medha worker --engine HOST:PORT`) to
        join at self.attach, then have every one load its shard."""
        import torch.distributed.rpc as rpc

        self._session = ATTACHED_SESSION
        world = self.world_size
        spec = self._spec(
            rpc_init=f"tcp://{self.attach}", pg_init="env://", threads=0, timeout_s=timeout_s
        )
        _log.info("waiting for workers", address=self.attach, world=world)
        # torch's TCP rendezvous waits for every member for 30 minutes, whatever the RPC
        # timeout: wait for it beside, for timeout_s. (If it times out, the rendezvous thread
        # stays blocked, holding the port, until the process exits.)
        errors: list[BaseException] = []

        def join_rpc() -> None:
            try:
                self._join_rpc(spec.rpc_init, timeout_s)
            except BaseException as exc:
                errors.append(exc)

        joiner = threading.Thread(target=join_rpc, name="rpc-rendezvous", daemon=True)
        joiner.start()
        joiner.join(timeout_s)
        if joiner.is_alive() or errors:
            why = f": {errors[0]}" if errors else f" within {timeout_s:.0f} s"
            raise WorkerStartError(f"{world} workers did not join the engine at {self.attach}{why}")
        # Every worker at once: loading joins the workers' collective world.
        futures = [
            rpc.rpc_async(
                worker_name(rank, self._session), configure_worker, args=(spec,), timeout=timeout_s
            )
            for rank in range(world)
        ]
        while not all(f.done() for f in futures):
            for rank, future in enumerate(futures):
                if future.done():
                    _raise_start_failure(rank, future)
            time.sleep(0.05)
        for rank, future in enumerate(futures):
            _raise_start_failure(rank, future)
        _log.info("workers attached", world=world, layout=str(self.layout))

    # -- steps ------------------------------------------------------------------------------

    def submit(
        self, steps: list[ShardStep], on_done: Callable[[int, StageDone | BaseException], None]
    ) -> None:
        """Send KVP group g's ShardStep to every worker of group g; `on_done(rank, result)` is
        called (on an RPC thread) as each worker finishes its stage."""
        import torch.distributed.rpc as rpc

        for rank in range(self.world_size):
            step = step_for_rank(steps, self.layout, rank)
            future = rpc.rpc_async(worker_name(rank, self._session), submit_step, args=(step,))
            future.add_done_callback(_reporter(rank, on_done))

    def dead_workers(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every worker that has exited."""
        return [
            (rank, process.exitcode)
            for rank, process in enumerate(self.processes)
            if process.exitcode is not None
        ]

    def unreachable_workers(self) -> list[tuple[int, str]]:
        """(rank, error) of every worker that does not answer a ping within _PING_TIMEOUT_S."""
        import torch.distributed.rpc as rpc

        pings = [
            rpc.rpc_async(worker_name(rank, self._session), ping_worker, timeout=_PING_TIMEOUT_S)
            for rank in range(self.world_size)
        ]
        silent = []
        for rank, ping in enumerate(pings):
            try:
                ping.wait()
            except Exception as exc:
                silent.append((rank, str(exc).splitlines()[0] if str(exc) else repr(exc)))
        return silent

    async def supervise(self, on_failure: Callable[[BaseException], None]) -> None:
        """Run as a task beside the scheduler actor: report the first worker that dies, and
        stop every worker when the task ends (the engine stops or fails)."""
        import anyio

        try:
            while True:
                if self.attach is None:
                    await anyio.sleep(_SUPERVISE_PERIOD_S)
                    dead = self.dead_workers()
                    if dead:
                        rank, code = dead[0]
                        on_failure(EngineFailedError(f"worker {rank} exited with code {code}"))
                        break
                else:
                    # No processes of ours to watch: every worker must answer a ping.
                    await anyio.sleep(_PING_PERIOD_S)
                    silent = await anyio.to_thread.run_sync(self.unreachable_workers)
                    if silent:
                        rank, error = silent[0]
                        on_failure(EngineFailedError(f"worker {rank} stopped answering: {error}"))
                        break
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.close)

    # -- stop -------------------------------------------------------------------------------

    def close(self, grace_s: float = 3.0) -> None:
        """Stop every worker (politely, then by force) and leave the RPC world. Idempotent; a
        second caller (a cancelled start beside the supervisor) waits for the first."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._close(grace_s)

    def _close(self, grace_s: float) -> None:
        import torch.distributed.rpc as rpc

        if self._rpc_started:
            if self.attach is None:
                live = [r for r, p in enumerate(self.processes) if p.exitcode is None]
            else:
                live = list(range(self.world_size))
            stops = []
            for rank in live:
                with contextlib.suppress(Exception):
                    stops.append(
                        rpc.rpc_async(
                            worker_name(rank, self._session), stop_worker, timeout=grace_s
                        )
                    )
            if self.attach is not None:
                # No processes to wait for: wait for the workers to acknowledge instead.
                for stop in stops:
                    with contextlib.suppress(Exception):
                        stop.wait()
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        for process in self.processes:
            process.join(timeout=2.0)
            if process.exitcode is None:
                process.kill()
                process.join(timeout=2.0)
        if self._rpc_started:
            # Not graceful: a graceful shutdown is a barrier with workers that are gone now.
            with contextlib.suppress(Exception):
                rpc.shutdown(graceful=False)
            self._rpc_started = False
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        global _live_cluster
        with _live_cluster_lock:
            if _live_cluster is self:
                _live_cluster = None
        _log.info("workers stopped", world=self.world_size)


def _reporter(
    rank: int, on_done: Callable[[int, StageDone | BaseException], None]
) -> Callable[[Any], None]:
    def report(future: Any) -> None:
        try:
            result = future.value()
        except BaseException as exc:
            on_done(rank, exc)
        else:
            on_done(rank, result)

    return report


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _raise_start_failure(rank: int, future: Any) -> None:
    try:
        future.wait()
    except Exception as exc:
        raise WorkerStartError(f"worker {rank} failed to start: {exc}") from exc


def _start_error(rank: int, detail: str) -> Exception:
    last = detail.strip().splitlines()[-1] if detail else "unknown error"
    return WorkerStartError(f"worker {rank} failed to start: {last}\n{detail}")
