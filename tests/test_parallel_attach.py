"""An engine attaches to workers started by torchrun (as on several nodes): the same exact
tokens as one process, and leaving the engine stops the workers and torchrun with them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import medha
from medha.cli import main
from tests.engine_support import StreamsUntilFailure, free_port
from tests.parallel_support import (
    parallel_config,
    run_concurrently,
    single_process_greedy,
    workload,
)

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _start_torchrun(address: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            str(BIN / "medha"),
            "worker",
            "--engine",
            address,
            "--timeout",
            "120",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _attached(address: str) -> medha.EngineConfig:
    return parallel_config(2, 1, 1).model_copy(
        update={"parallel": medha.ParallelConfig(tp=2, attach=address, timeout_s=120)}
    )


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # One machine here: keep both the engine's and the workers' traffic on loopback.
    for name in ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        monkeypatch.setenv(name, "lo")


@pytest.mark.slow
async def test_engine_attaches_to_torchrun_workers(tmp_path: Path, loopback: None) -> None:
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "torchrun.log"
    torchrun = _start_torchrun(address, log)
    try:
        work = workload(seed=3, count=4, long_prompts=1)
        async with medha.Engine(_attached(address)) as engine:
            outputs = await run_concurrently(engine, work)
        for (prompt, max_tokens), tokens in zip(work, outputs, strict=True):
            assert tokens == single_process_greedy(prompt, max_tokens)
        assert torchrun.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()


@pytest.mark.slow
async def test_an_attached_worker_that_dies_fails_every_open_stream(
    tmp_path: Path, loopback: None
) -> None:
    # Run after the test above, this is also the second attached engine of this process (torch
    # numbers RPC start-up rounds per set of names, which attached engines reuse).
    address = f"127.0.0.1:{free_port()}"
    torchrun = _start_torchrun(address, tmp_path / "torchrun.log")
    streams = StreamsUntilFailure()
    try:
        config = _attached(address).model_copy(update={"num_blocks": 256})
        async with medha.Engine(config) as engine, anyio.create_task_group() as group:
            streams.start(group, engine)
            await streams.wait_streaming()
            os.kill(_children(torchrun.pid)[0], signal.SIGKILL)
            await streams.wait_failed(10.0)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
        torchrun.wait()


def test_worker_outside_torchrun_says_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert main(["worker", "--engine", "127.0.0.1:29500"]) == 2
    assert "start `medha worker` with torchrun" in capsys.readouterr().err


def test_attach_address_is_validated() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        medha.ParallelConfig(tp=2, attach="no-port")


async def test_attaching_at_a_port_in_use_is_a_clear_error() -> None:
    from medha.parallel.cluster import WorkerStartError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        config = parallel_config(2, 1, 1).model_copy(
            update={"parallel": medha.ParallelConfig(tp=2, attach=address, timeout_s=120)}
        )
        with anyio.fail_after(60), pytest.raises(WorkerStartError, match=address):
            await medha.Engine(config).start()


async def test_an_engine_nobody_attaches_to_gives_up_after_timeout_s() -> None:
    from medha.parallel.cluster import WorkerStartError

    address = f"127.0.0.1:{free_port()}"
    config = parallel_config(2, 1, 1).model_copy(
        update={"parallel": medha.ParallelConfig(tp=2, attach=address, timeout_s=2)}
    )
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match="did not join"):
        await medha.Engine(config).start()
    assert time.monotonic() - started < 20
