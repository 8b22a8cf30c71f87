"""An engine attaches to workers started by torchrun (as on several nodes): the same exact
tokens as one process, and leaving the engine stops the workers and torchrun with them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import medha
from medha.cli import main
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_engine_attaches_to_torchrun_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One machine here: keep both the engine's and the workers' traffic on loopback.
    for name in ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        monkeypatch.setenv(name, "lo")
    address = f"127.0.0.1:{_free_port()}"
    log = (tmp_path / "torchrun.log").open("w")
    torchrun = subprocess.Popen(
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
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        config = parallel_config(2, 1, 1).model_copy(
            update={"parallel": medha.ParallelConfig(tp=2, attach=address)}
        )
        work = workload(seed=3, count=4, long_prompts=1)
        async with medha.Engine(config) as engine:
            outputs = await run_concurrently(engine, work)
        for (prompt, max_tokens), tokens in zip(work, outputs, strict=True):
            assert tokens == single_process_greedy(prompt, max_tokens)
        assert torchrun.wait(timeout=60) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()


def test_worker_outside_torchrun_says_how_to_start_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun"):
        main(["worker", "--engine", "127.0.0.1:29500"])


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
            update={"parallel": medha.ParallelConfig(tp=2, attach=address)}
        )
        with anyio.fail_after(60), pytest.raises(WorkerStartError, match=address):
            await medha.Engine(config).start()
