"""medha.LLM's lifetime: its errors are the engine's own, a dropped LLM stops its engine, and a
forked child gets an error instead of waiting on threads it does not have."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import warnings
import weakref

import pytest

import medha
from medha import EngineClosedError, EngineFailedError, SamplingParams
from tests.engine_support import engine_config

LONG = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)


def wait_until(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_failing_engine_raises_its_error_not_an_exception_group() -> None:
    with medha.LLM(engine_config()) as llm:
        runner = llm.engine._stage.runner  # type: ignore[union-attr]

        def broken_step(*args: object, **kwargs: object) -> None:
            raise RuntimeError("device lost")

        runner.start_step = broken_step
        with pytest.raises(EngineFailedError) as failed:
            llm.generate(["one", "two", "three"], LONG)
        assert type(failed.value) is EngineFailedError


def test_closing_from_another_thread_ends_a_running_generate_with_engine_closed_error() -> None:
    llm = medha.LLM(engine_config())
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(["one", "two"], LONG)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=generate)
    worker.start()
    wait_until(lambda: llm.engine.stats().running == 2)
    llm.close()
    worker.join(timeout=20)
    assert len(outcome) == 1 and type(outcome[0]) is EngineClosedError


def test_an_llm_dropped_without_close_stops_its_engine_and_warns() -> None:
    llm = medha.LLM(engine_config())
    assert len(llm.generate("hello", SamplingParams(max_tokens=2))) == 1
    engine, dropped = llm.engine, weakref.ref(llm)
    threads_before = {t.name for t in threading.enumerate()}
    with pytest.warns(ResourceWarning, match="without close"):
        del llm
        gc.collect()
    assert dropped() is None
    wait_until(lambda: engine._closed)
    # The model thread and the loop's thread end too.
    wait_until(lambda: len(threading.enumerate()) < len(threads_before))
    with pytest.raises(EngineClosedError):
        engine.stats()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dropped_llm_stops_its_engine_even_where_its_warning_is_an_error() -> None:
    llm = medha.LLM(engine_config())
    engine = llm.engine
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del llm
        gc.collect()  # the finalizer's warning raises in it (and is reported, not raised here)
    wait_until(lambda: engine._closed)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_an_error_instead_of_waiting_forever() -> None:
    with medha.LLM(engine_config()) as llm:
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only for the expected error
            code = 1
            try:
                llm.generate("hello", SamplingParams(max_tokens=2))
            except EngineClosedError as exc:
                code = 0 if "another process" in str(exc) else 2
            except BaseException:
                code = 3
            llm.close()  # nothing to stop here, and it must not wait on the parent's threads
            os._exit(code)
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                pytest.fail("the forked child hung")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(waited[1]) == 0
        # The parent's LLM still works.
        assert (
            len(llm.generate("hello", SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids)
            == 2
        )


def test_ctrl_c_while_the_model_loads_raises_and_leaves_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interrupt reaches the caller's thread while it waits for the engine to start: the
    portal must cancel the start (before, it waited for a serving task that never ends)."""
    import anyio
    from anyio.from_thread import BlockingPortal

    async def loading(self: medha.Engine) -> None:
        await anyio.sleep(60)

    monkeypatch.setattr(medha.Engine, "start", loading)
    start_task = BlockingPortal.start_task

    def interrupted(portal: BlockingPortal, *args: object, **kwargs: object) -> None:
        def start() -> None:
            with contextlib.suppress(BaseException):  # cancelled with the portal
                start_task(portal, *args, **kwargs)  # type: ignore[arg-type]

        threading.Thread(target=start, daemon=True).start()
        time.sleep(0.2)  # the engine is loading
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockingPortal, "start_task", interrupted)
    before = set(threading.enumerate())
    outcome: list[BaseException] = []

    def create() -> None:
        try:
            medha.LLM(engine_config())
        except BaseException as exc:
            outcome.append(exc)

    creating = threading.Thread(target=create, daemon=True)
    creating.start()
    creating.join(timeout=20)
    assert not creating.is_alive(), "LLM() hung after the interrupt"
    assert [type(exc) for exc in outcome] == [KeyboardInterrupt]
    wait_until(lambda: set(threading.enumerate()) <= before, timeout=5)


def test_close_racing_a_generate_is_engine_closed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() on another thread between generate's check and its start on the loop."""
    llm = medha.LLM(engine_config())
    from medha import llm as llm_module

    def close_meanwhile() -> None:
        closing = threading.Thread(target=llm.close)
        closing.start()
        closing.join()

    monkeypatch.setattr(llm_module, "release_idle_threads", close_meanwhile)
    with pytest.raises(EngineClosedError, match="closed"):
        llm.generate("Hi", SamplingParams(max_tokens=2))
