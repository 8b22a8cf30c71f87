"""A worker process: one (pipeline stage, KVP group, TP rank) of the replica.

Start-up: join the RPC world (the engine is RPC rank 0, worker r is RPC rank r + 1) and the
collective world of the workers, build the process groups, load this rank's shard of the model,
then report "ready" (or the error) on the start-up queue. Afterwards it only serves RPCs:
`submit_step` (a ShardStep, answered when this rank's stage of it is done) and `stop_worker`.

A worker never outlives the engine: it exits when told to, and on its own when its parent
process disappears.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.rpc as rpc

from medha.parallel.layout import SAMPLING_GROUP, RankLayout, split_layers
from medha.parallel.messages import ShardStep, StageDone

# Test hook: the rank named here raises during start-up (the fault tests' "bad worker").
FAIL_AT_START_ENV = "MEDHA_TEST_WORKER_FAIL_AT_START"

ATTACHED_SESSION = "attached"
"""The RPC name suffix of an engine and the torchrun-started workers it attaches to."""

_STAGE: Any = None
_STOP = threading.Event()


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable (it crosses the spawn boundary)."""

    model: str
    dtype: str
    device: str
    attention_backend: str
    layout: RankLayout
    num_blocks: int
    block_size: int
    rpc_init: str
    """file:// rendezvous of the RPC world (engine + workers)."""
    session: str
    """Suffix of every RPC name of this engine's world. Unique per engine: torch's RPC keeps
    per-name-set counters across worlds, so a second engine in the same process reusing the
    names of the first would wait forever in the rendezvous."""
    pg_init: str
    """file:// rendezvous of the collective world (workers only)."""
    threads: int
    """torch intra-op threads per worker (CPU); 0: the worker's node decides."""
    timeout_s: float = 300.0


def worker_name(rank: int, session: str) -> str:
    return f"worker{rank}-{session}"


def driver_name(session: str) -> str:
    return f"driver-{session}"


def device_for(spec: WorkerSpec, rank: int) -> torch.device:
    if spec.device.startswith("cuda"):
        # One GPU per worker: torchrun's LOCAL_RANK when attached, else round-robin over the
        # visible ones (spawned workers all run on this node).
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device(spec.device)


def worker_main(rank: int, spec: WorkerSpec, status: Any) -> None:
    """Entry point of the spawned process."""
    # Ctrl-C in a terminal signals the whole process group: the workers leave it to the
    # engine, which stops them once its streams are done (or the parent watch does, if the
    # engine dies). SIGTERM keeps its default: multiprocessing's exit hook terminates daemon
    # children with it and then joins them, without a timeout.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _watch_parent(os.getppid())
        _start(rank, spec)
    except BaseException:
        status.put(("error", rank, traceback.format_exc()))
        # Do not run teardown that may wait on peers that are gone: leave at once.
        time.sleep(0.2)  # let the queue's feeder thread flush
        os._exit(1)
    status.put(("ready", rank, None))
    _STOP.wait()
    time.sleep(0.1)  # let the reply to stop_worker go out
    os._exit(0)


def _start(rank: int, spec: WorkerSpec) -> None:
    # Loopback only unless the user chose interfaces (a multi-node attach sets these).
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    _join_rpc(rank, spec.layout.world_size, spec.rpc_init, spec.session, spec.timeout_s)
    _load_stage(rank, spec)


def _join_rpc(rank: int, world: int, init_method: str, session: str, timeout_s: float) -> None:
    """Join the RPC world of the engine (RPC rank 0) and the `world` workers (ranks 1..world)."""
    with warnings.catch_warnings():
        # torch's RPC start-up makes a deprecated gloo call of its own (torch 2.13).
        warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
        rpc.init_rpc(
            worker_name(rank, session),
            rank=rank + 1,
            world_size=world + 1,
            rpc_backend_options=rpc_options(init_method, timeout_s),
        )


def rpc_options(init_method: str, timeout_s: float) -> rpc.TensorPipeRpcBackendOptions:
    """The RPC world's options, the engine's and every worker's: TensorPipe over TCP (uv).
    Its default shared-memory transport polls: its reactor thread kept a core busy in each
    process while the engine was idle (an idle kvp=2 engine: 3.4, 3.1 and 3.4 CPU-seconds
    per 5 s in the engine and its two workers, against 0.02 to 0.07 over TCP), and in a
    surviving worker after another failed, until the engine stopped. The RPCs carry plans and
    replies only (hidden states go over the collective backend), for which loopback TCP's
    tens of microseconds are nothing beside a step."""
    return rpc.TensorPipeRpcBackendOptions(
        init_method=init_method,
        num_worker_threads=8,
        rpc_timeout=timeout_s,
        _transports=["uv"],
        _channels=["basic"],
    )


def _load_stage(rank: int, spec: WorkerSpec) -> None:
    """Join the workers' collective world, build the groups, load this rank's shard."""
    import torch.distributed as dist

    from medha.actors.remote_stage import RemoteStage
    from medha.kernels import select_backend
    from medha.model.kv_cache import KVCache
    from medha.model.loader import load_checkpoint
    from medha.model.openmp import release_idle_threads
    from medha.model.setup import resolve_dtype
    from medha.parallel.groups import build_groups
    from medha.parallel.kvp import KvpMerge
    from medha.parallel.stage_model import StageModel

    global _STAGE
    device = device_for(spec, rank)
    if device.type == "cpu":
        # 0 (attached workers): share this node's cores among torchrun's local workers.
        local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // local_workers))
    else:
        torch.cuda.set_device(device)
    layout = spec.layout
    world = layout.world_size
    timeout = timedelta(seconds=spec.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=spec.pg_init, rank=rank, world_size=world, timeout=timeout
    )
    if os.environ.get(FAIL_AT_START_ENV) == str(rank):
        raise RuntimeError(f"worker {rank}: failure injected by {FAIL_AT_START_ENV}")
    groups = build_groups(layout, rank)
    coords = layout.coords(rank)
    checkpoint = load_checkpoint(spec.model)
    layers = split_layers(checkpoint.arch.num_layers, layout.pp)[coords.pp]
    dtype = resolve_dtype(spec.dtype)
    first, last = coords.pp == 0, coords.pp == layout.pp - 1
    model = StageModel.load(
        checkpoint, layers, first, last, coords.tp, layout.tp, groups.tp, dtype, device
    )
    cache = KVCache(model.arch, spec.num_blocks, spec.block_size, dtype, device, layers)
    _, attention = select_backend(device, spec.attention_backend)
    _STAGE = RemoteStage(
        rank,
        model,
        cache,
        attention,
        prev_rank=layout.prev_stage(rank),
        next_rank=layout.next_stage(rank),
        samples=rank == layout.sampler_rank,
        heads=last and coords.kvp == SAMPLING_GROUP,
        kvp_merge=(
            KvpMerge(groups.kvp, layout.kvp, model.arch.num_heads, model.arch.head_dim, device)
            if layout.kvp > 1
            else None
        ),
        device=device,
        pp=layout.pp,
        kvp_group=coords.kvp,
        report_to=(
            layout.rank(coords.pp, SAMPLING_GROUP, coords.tp)
            if last and coords.kvp != SAMPLING_GROUP
            else None
        ),
        reporters={
            group: layout.rank(coords.pp, group, coords.tp)
            for group in range(layout.kvp)
            if last and group != SAMPLING_GROUP
        },
    )
    # Loading ran parallel regions on this thread; the steps run on the stage's thread. Free
    # this thread's idle OpenMP pool, or libgomp would slow the stage's (medha.model.openmp).
    release_idle_threads()


def serve_attached(engine: str, timeout_s: float = 600.0) -> None:
    """A worker started by torchrun (`medha worker --engine HOST:PORT`): join the engine's RPC
    world at tcp://HOST:PORT as worker RANK of WORLD_SIZE (torchrun's variables), wait for the
    engine to send the WorkerSpec (`configure_worker`), then serve steps until stopped. The
    workers' collective world uses torchrun's own rendezvous (MASTER_ADDR, MASTER_PORT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    joined = threading.Event()

    def give_up() -> None:
        # init_rpc's rendezvous waits torch's default 30 minutes, whatever timeout_s says.
        if not joined.wait(timeout_s):
            print(
                f"medha worker: the engine at {engine} did not let worker {rank} of {world} "
                f"join within {timeout_s:g} s (--timeout); is it started, with attach="
                f"{engine!r} and a world of {world}?",
                file=sys.stderr,
                flush=True,
            )
            os._exit(4)

    threading.Thread(target=give_up, name="join-timeout", daemon=True).start()
    _join_rpc(rank, world, f"tcp://{engine}", ATTACHED_SESSION, timeout_s)
    joined.set()
    _watch_engine()
    _STOP.wait()
    time.sleep(0.1)  # let the reply to stop_worker go out
    os._exit(0)


def _watch_engine() -> None:
    """Exit if the engine stops answering (its process died without stopping us)."""

    def watch() -> None:
        engine = driver_name(ATTACHED_SESSION)
        while True:
            time.sleep(2.0)
            try:
                rpc.rpc_sync(engine, engine_alive, timeout=10.0)
            except Exception:
                if _STOP.is_set():
                    return  # a clean stop: the engine left the RPC world first
                os._exit(3)

    threading.Thread(target=watch, name="engine-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit if the engine's process dies without stopping us (killed, crashed)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# -- RPC entry points (run on the worker's RPC threads) -------------------------------------


@rpc.functions.async_execution
def submit_step(step: ShardStep) -> torch.futures.Future[StageDone]:
    """Queue `step`; the future completes when this rank's stage of it is done."""
    if _STAGE is None:
        raise RuntimeError("the worker is not ready")
    return _STAGE.submit(step)


def configure_worker(spec: WorkerSpec) -> None:
    """Attached workers: load this rank's shard as `spec` says (the engine calls every worker at
    once: loading joins the workers' collective world, which waits for all of them)."""
    rank = int(os.environ["RANK"])
    if spec.layout.world_size != int(os.environ["WORLD_SIZE"]):
        raise ValueError(
            f"the engine's layout needs {spec.layout.world_size} workers; torchrun started "
            f"{os.environ['WORLD_SIZE']}"
        )
    _load_stage(rank, spec)


def ping_worker() -> bool:
    """Runs on a worker: the engine's supervisor calls it to notice a worker that is gone."""
    return True


def engine_alive() -> bool:
    """Runs on the engine: attached workers call it to notice an engine that is gone."""
    return True


def stop_worker() -> None:
    _STOP.set()
