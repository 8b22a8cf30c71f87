"""Worker processes never outlive the engine and never hang it: a worker killed mid-stream fails
every open stream with EngineFailedError within 10 s, leaving the engine reaps every child, and a
worker that cannot start (or a bad model path) is a clear error at start, not a hang."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from pathlib import Path

import anyio
import pytest

import medha
from medha import SamplingParams
from medha.parallel.cluster import WorkerStartError
from medha.parallel.worker import FAIL_AT_START_ENV
from tests.engine_support import StreamsUntilFailure, start_cancelled_as_its_actors_start
from tests.parallel_support import parallel_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _worker_pids(engine: medha.Engine) -> list[int]:
    cluster = engine._scheduler_actor.cluster  # type: ignore[union-attr]
    return [p.pid for p in cluster.processes if p.pid is not None]


def _thread_names(pid: int) -> set[str]:
    """The names of a process's threads (Linux's /proc)."""
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            names.add((task / "comm").read_text().strip())
    return names


async def test_leaving_the_engine_terminates_every_worker() -> None:
    async with medha.Engine(parallel_config(2, 1, 1)) as engine:
        pids = _worker_pids(engine)
        assert len(pids) == 2
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len((await engine.generate([1, 2, 3], params)).token_ids) == 3
        if Path("/proc/self/task").is_dir():
            # RPC over TCP: TensorPipe's shared-memory transport runs a reactor thread that
            # polls, a core busy in each process while the engine idles (worker.rpc_options).
            for pid in (os.getpid(), *pids):
                assert not any(name.startswith("TP_SHM") for name in _thread_names(pid))
        # Idle: the actor sent the workers the request to forget, not left for the next plan.
        scheduler = engine._scheduler_actor.scheduler  # type: ignore[union-attr]
        with anyio.fail_after(5):
            while scheduler.table.released:
                await anyio.sleep(0.01)
    _assert_gone(pids)


async def test_killing_a_worker_mid_stream_fails_every_open_stream_within_10_s() -> None:
    streams = StreamsUntilFailure()
    async with medha.Engine(parallel_config(1, 2, 1, num_blocks=256)) as engine:
        pids = _worker_pids(engine)
        async with anyio.create_task_group() as group:
            streams.start(group, engine)
            await streams.wait_streaming()
            cluster = engine._scheduler_actor.cluster  # type: ignore[union-attr]
            killed_at = time.monotonic()
            cluster.processes[1].kill()
            await streams.wait_failed(10.0)
            assert time.monotonic() - killed_at < 10
    assert max(streams.counts) < streams.params.max_tokens
    _assert_gone(pids)


async def test_a_worker_failing_at_start_up_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAIL_AT_START_ENV, "1")  # spawned workers inherit the environment
    engine = medha.Engine(parallel_config(2, 1, 1))
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match=r"worker 1 failed to start.*injected"):
        await engine.start()
    assert time.monotonic() - started < 60
    assert not multiprocessing.active_children()


async def test_a_bad_model_path_fails_before_any_worker_starts() -> None:
    config = parallel_config(2, 1, 1).model_copy(update={"model": "/nonexistent/model"})
    started = time.monotonic()
    with pytest.raises(medha.ModelLoadError):
        await medha.Engine(config).start()
    assert time.monotonic() - started < 5
    assert not multiprocessing.active_children()


async def test_a_start_cancelled_while_workers_start_leaves_nothing_behind() -> None:
    """asyncio.wait_for(engine.start(), ...) or a shutdown mid-start: the start's thread runs on
    and starts the workers; they are stopped, their store folder removed, and the process can
    start another engine (whose RPC world would otherwise clash with the first's)."""
    import glob
    import tempfile

    stores = set(glob.glob(f"{tempfile.gettempdir()}/medha-workers-*"))
    engine = medha.Engine(parallel_config(2, 1, 1))
    with pytest.raises(TimeoutError):  # the workers take seconds to start
        await asyncio.wait_for(engine.start(), 0.5)
    await engine.stop()  # waits for the start's thread, which stops the workers it started
    assert not multiprocessing.active_children()
    assert set(glob.glob(f"{tempfile.gettempdir()}/medha-workers-*")) == stores
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    async with medha.Engine(parallel_config(2, 1, 1)) as again:
        assert len((await again.generate([1, 2, 3], params)).token_ids) == 3


async def test_a_start_cancelled_as_its_actors_start_leaves_a_closed_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = medha.Engine(parallel_config(2, 1, 1))
    await start_cancelled_as_its_actors_start(engine, monkeypatch)
    with pytest.raises(medha.EngineClosedError):  # not a snapshot of a dead engine
        engine.stats()
    await engine.stop()
    assert not multiprocessing.active_children()


async def test_a_second_multi_process_engine_is_refused_before_its_workers_start() -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    async with medha.Engine(parallel_config(2, 1, 1)) as first:
        workers = set(multiprocessing.active_children())
        with pytest.raises(WorkerStartError, match="one multi-process engine per Python process"):
            async with medha.Engine(parallel_config(1, 2, 1)):
                pass
        assert set(multiprocessing.active_children()) == workers  # none of its own started
        assert len((await first.generate([1, 2, 3], params)).token_ids) == 3
    async with medha.Engine(parallel_config(1, 2, 1)) as second:  # once the first stopped
        assert len((await second.generate([1, 2, 3], params)).token_ids) == 3


async def test_workers_leave_ctrl_c_to_the_engine() -> None:
    """A terminal's Ctrl-C signals the whole process group: the workers ignore it, and the
    engine finishes its streams and stops them itself."""
    import signal

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    async with medha.Engine(parallel_config(2, 1, 1)) as engine:
        pids = _worker_pids(engine)
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        await anyio.sleep(0.5)
        assert len((await engine.generate([1, 2, 3], params)).token_ids) == 3
    _assert_gone(pids)


async def test_a_request_beyond_a_kvp_groups_share_is_refused_before_it_is_queued() -> None:
    # 2 blocks of 16 tokens per group, 48 tokens of a request per group at most: the groups
    # hold 64 tokens in all, but a request's first group must hold its first 32+ tokens alone.
    config = parallel_config(
        1,
        1,
        2,
        num_blocks=2,
        parallel=medha.ParallelConfig(kvp=2, max_tokens_per_kvp_group=48, timeout_s=120),
    )
    async with medha.Engine(config) as engine:
        for prompt, max_tokens in [(40, 1), (20, 20)]:
            with pytest.raises(medha.RequestTooLargeError, match=r"needs KV for.*raise num_"):
                engine.stream([5] * prompt, SamplingParams(max_tokens=max_tokens))
        done = await engine.generate([5] * 20, SamplingParams(max_tokens=4, temperature=0.0))
        assert len(done.token_ids) == 4
        stats = engine.stats()
        assert (stats.waiting, stats.running, stats.free_blocks) == (0, 0, stats.total_blocks)


def test_a_worker_dead_before_it_could_report_points_at_the_main_module_guard() -> None:
    # What a script without `if __name__ == "__main__":` meets: each spawned worker imports
    # it, starts an engine during its bootstrap, and dies before it can report anything.
    import queue
    from types import SimpleNamespace

    from medha.parallel.cluster import Cluster
    from medha.parallel.layout import RankLayout

    cluster = Cluster({}, RankLayout(tp=2))
    cluster.processes = [SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=1)]  # type: ignore[list-item]
    with pytest.raises(WorkerStartError, match="worker 1 exited with code 1") as failed:
        cluster._raise_if_dead(queue.Queue())
    assert 'under `if __name__ == "__main__":`' in str(failed.value)
