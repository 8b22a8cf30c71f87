"""The engine's model thread: every torch call of an engine (loading, calibration, steps) runs on
one thread, which a cancelled caller waits for; and before each call the loop thread's idle
OpenMP pool is freed, which libgomp would otherwise count against the model thread's."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

import medha
from medha.actors import model_thread as model_thread_module
from medha.actors.model_thread import ModelThread
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_every_call_runs_on_one_thread_off_the_loop() -> None:
    thread = ModelThread("test-model")
    try:
        threads = {await thread.run(threading.current_thread) for _ in range(6)}
    finally:
        thread.close()
    assert threads == {thread.thread}
    assert thread.thread is not threading.current_thread()


class SlowCall:
    """A model thread and a 0.3 s call on it that records when it ends."""

    def __init__(self) -> None:
        self.thread = ModelThread("test-model")
        self.finished = threading.Event()

    def call(self) -> None:
        time.sleep(0.3)
        self.finished.set()


@pytest.fixture
def slow() -> Iterator[SlowCall]:
    slow = SlowCall()
    yield slow
    slow.thread.close()


async def test_a_cancelled_caller_waits_for_the_call_to_finish(slow: SlowCall) -> None:
    with anyio.move_on_after(0.05) as scope:
        await slow.thread.run(slow.call)
    assert scope.cancelled_caught
    # The cancellation surfaced only after the work ended: no step overlaps the next.
    assert slow.finished.is_set()


async def test_a_plain_asyncio_cancel_also_waits_for_the_call(slow: SlowCall) -> None:
    # A timeout around Engine.start, or Ctrl-C in asyncio.run, cancels without anyio.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow.thread.run(slow.call), timeout=0.05)
    assert slow.finished.is_set()


async def test_errors_reach_the_caller_and_the_thread_keeps_serving() -> None:
    thread = ModelThread("test-model")

    def broken() -> None:
        raise KeyError("no such block")

    try:
        with pytest.raises(KeyError, match="no such block"):
            await thread.run(broken)
        assert await thread.run(lambda x: x + 1, 41) == 42
    finally:
        thread.close()


async def test_each_call_first_frees_the_calling_threads_idle_pool(monkeypatch) -> None:
    released_on: list[int] = []
    monkeypatch.setattr(
        model_thread_module,
        "release_idle_threads",
        lambda: released_on.append(threading.get_ident()) or True,
    )
    thread = ModelThread("test-model")
    try:
        await thread.run(lambda: None)
        await thread.run(lambda: None)
    finally:
        thread.close()
    assert released_on == [threading.get_ident()] * 2


async def test_the_engine_loads_and_steps_on_its_model_thread_which_ends_with_it(
    monkeypatch,
) -> None:
    from medha.model.layerwise import LayerwiseStep
    from medha.model.runner import ModelRunner

    config = engine_config()  # calibrates the test profile here, once per session
    step_threads: set[int] = set()
    real_start, real_advance = ModelRunner.start_step, LayerwiseStep.advance

    # Every step starts with start_step, and its layers run in advance (a paused step's too).
    def recording_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        step_threads.add(threading.get_ident())
        return real_start(self, *args, **kwargs)

    def recording_advance(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        step_threads.add(threading.get_ident())
        return real_advance(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "start_step", recording_start)
    monkeypatch.setattr(LayerwiseStep, "advance", recording_advance)
    async with medha.Engine(config) as engine:
        model_thread = engine._model_thread
        assert model_thread is not None
        built_on = model_thread.thread  # set by the first call: the build
        assert built_on is not None and built_on is not threading.current_thread()
        done = await engine.generate(
            [5, 6, 7, 8], medha.SamplingParams(max_tokens=4, ignore_eos=True)
        )
        assert len(done.token_ids) == 4
        assert step_threads == {built_on.ident}
    for _ in range(100):
        if not built_on.is_alive():
            break
        await anyio.sleep(0.02)
    else:
        pytest.fail("the model thread outlived its engine")


_POOL_SCRIPT = textwrap.dedent(
    """
    import os
    import time
    import torch
    from medha.model.openmp import release_idle_threads

    def threads():
        return len(os.listdir("/proc/self/task"))

    def settled(expected):
        # The pool's workers leave after the call returns: wait up to 2 s for them.
        for _ in range(200):
            if threads() == expected:
                break
            time.sleep(0.01)
        return threads()

    x = torch.randn(512, 4096)
    before = threads()
    (x * x).sum()  # a parallel region: this thread gets a pool of one more OpenMP thread
    with_pool = threads()
    released = release_idle_threads()
    after = settled(before)
    (x * x).sum()  # works again, with a new pool
    print(before, with_pool, released, after, threads())
    """
)


def test_release_frees_the_calling_threads_openmp_pool_and_a_new_one_follows() -> None:
    # The tests run with one OpenMP thread; a pool needs two.
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", _POOL_SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    before, with_pool, released, after, again = out
    assert released == "True"
    assert int(with_pool) == int(before) + 1
    assert int(after) == int(before)
    assert int(again) == int(with_pool)


def test_llm_frees_the_calling_threads_pool_before_each_batch(monkeypatch) -> None:
    # The caller only waits while the model thread works: its idle pool must not count.
    import medha.llm as llm_module

    config = engine_config()
    released_on: list[int] = []
    monkeypatch.setattr(
        llm_module,
        "release_idle_threads",
        lambda: released_on.append(threading.get_ident()) or True,
    )
    with medha.LLM(config) as llm:
        llm.generate([5, 6, 7], medha.SamplingParams(max_tokens=2))
        llm.generate(["one", "two"], medha.SamplingParams(max_tokens=2))
    assert released_on == [threading.get_ident()] * 2
