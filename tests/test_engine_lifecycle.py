"""An engine's life among the caller's tasks: stopping it from another task ends the caller's
pending calls with EngineClosedError and never cancels the caller; engines stop in any order;
closing under open streams is never reported as a failure; a request id is free again once its
request has ended, and a stream that ends late cannot abort the id's next request; the engine
refuses calls from a loop it does not run on; medha.LLM validates a whole batch first."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

import medha
from medha import EngineClosedError, InvalidRequestError, SamplingParams
from medha.errors import WrongEventLoopError
from tests.engine_support import engine_config, start_cancelled_as_its_actors_start

pytestmark = pytest.mark.anyio

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_stopping_from_another_task_ends_the_callers_call_but_not_the_caller() -> None:
    trace = []
    async with medha.Engine(engine_config()) as engine:

        async def shut_down() -> None:
            await anyio.sleep(0.2)
            await engine.stop()

        stopper = asyncio.get_running_loop().create_task(shut_down())
        with pytest.raises(EngineClosedError):
            await engine.generate("a long answer", LONG)
        trace.append("generate ended")
        await stopper
        trace.append("body continued")
    trace.append("after the engine")
    assert trace == ["generate ended", "body continued", "after the engine"]


async def test_engines_stop_in_any_order() -> None:
    first, second = medha.Engine(engine_config()), medha.Engine(engine_config())
    await first.start()
    await second.start()
    try:
        await first.stop()
        completion = await second.generate("still here", SHORT)
        assert completion.finish_reason == "length"
    finally:
        await second.stop()
        await first.stop()


async def test_closing_under_open_streams_is_a_close_not_a_failure() -> None:
    for _ in range(4):
        errors: list[BaseException] = []
        async with medha.Engine(engine_config()) as engine:

            async def consume(
                engine: medha.Engine = engine, errors: list[BaseException] = errors
            ) -> None:
                try:
                    async for _ in engine.stream("open stream", LONG):
                        pass
                except Exception as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(consume)
                group.start_soon(consume)
                await anyio.sleep(0.1)
                await engine.stop()
        assert len(errors) == 2
        assert all(type(error) is EngineClosedError for error in errors), errors


async def test_a_stream_closed_after_its_request_ended_leaves_the_ids_next_request_alone() -> None:
    async with medha.Engine(engine_config()) as engine:
        old = engine.stream("first turn", SHORT, request_id="conversation")
        await old.__anext__()
        with anyio.fail_after(10):
            while engine.stats().finished < 1:  # the request ends; its stream is not read
                await anyio.sleep(0.01)
        new_turn = asyncio.get_running_loop().create_task(
            engine.generate("second turn", LONG, request_id="conversation")
        )
        await anyio.sleep(0.05)
        await old.aclose()  # the old stream ends only now, as an abandoned generator would
        completion = await new_turn
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == LONG.max_tokens


async def test_an_id_is_free_again_as_soon_as_its_stream_is_cancelled() -> None:
    async with medha.Engine(engine_config()) as engine:
        with anyio.move_on_after(0.2):
            await engine.generate("timed out", LONG, request_id="retry")
        completion = await engine.generate("retried", SHORT, request_id="retry")
    assert completion.finish_reason == "length"


async def test_an_id_held_by_a_stream_not_yet_started_is_in_use() -> None:
    async with medha.Engine(engine_config()) as engine:
        first = engine.stream("one", SHORT, request_id="twin")
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.stream("two", SHORT, request_id="twin")
        async for _ in first:
            pass
        assert (await engine.generate("three", SHORT, request_id="twin")).finish_reason


async def _error_on_another_loop(use: Callable[[], Awaitable[object]]) -> BaseException | None:
    """Run `use()` on a fresh event loop in another thread; what it raised, if anything."""
    outcome: list[BaseException] = []

    def other_thread() -> None:
        try:
            asyncio.run(use())  # type: ignore[arg-type]
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()
    return outcome[0] if outcome else None


async def test_calls_from_another_event_loop_are_refused_at_once() -> None:
    async with medha.Engine(engine_config()) as engine:
        error = await _error_on_another_loop(lambda: engine.generate("from elsewhere", SHORT))
        assert isinstance(error, WrongEventLoopError)
        assert (await engine.generate("from home", SHORT)).finish_reason == "length"


async def test_numpy_token_ids_are_a_prompt() -> None:
    async with medha.Engine(engine_config()) as engine:
        plain = await engine.generate([5, 6, 7], SHORT)
        numpy = await engine.generate(list(np.array([5, 6, 7], dtype=np.int64)), SHORT)
    assert numpy.token_ids == plain.token_ids
    assert all(type(token) is int for token in numpy.prompt_token_ids)


async def test_numpy_scalars_are_a_deadline_and_a_max_tokens() -> None:
    params = SamplingParams(max_tokens=np.int64(3), temperature=0.0, ignore_eos=True)  # type: ignore[arg-type]
    async with medha.Engine(engine_config()) as engine:
        for deadline in (np.float32(2.0), np.int64(2)):
            done = await engine.generate([5, 6, 7], params, deadline)  # type: ignore[arg-type]
            assert len(done.token_ids) == 3 and done.metrics.deadline == 2.0
        with pytest.raises(InvalidRequestError):
            await engine.generate([5, 6, 7], params, np.float32("nan"))  # type: ignore[arg-type]


def test_llm_validates_the_whole_batch_before_queueing_any_of_it() -> None:
    with medha.LLM(engine_config()) as llm:
        with pytest.raises(InvalidRequestError, match="empty"):
            llm.generate(["fine", "also fine", ""], SHORT)
        with pytest.raises(InvalidRequestError):
            llm.generate(["fine", "also fine"], SHORT, deadlines=[1.0, float("nan")])
        stats = llm.engine.stats()
        assert stats.iterations == 0 and stats.finished == 0 and stats.aborted == 0
        assert [r.finish_reason for r in llm.generate(["fine"], SHORT)] == ["length"]


def test_a_closed_llm_says_so_and_closes_twice() -> None:
    llm = medha.LLM(engine_config())
    llm.close()
    llm.close()
    with pytest.raises(EngineClosedError):
        llm.generate(["too late"], SHORT)


async def test_every_concurrent_stop_returns_once_the_actors_have_stopped() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    host_task = engine._host._task  # type: ignore[union-attr]
    assert host_task is not None

    async def stop_and_check() -> None:
        await engine.stop()
        assert host_task.done()

    async with anyio.create_task_group() as group:
        group.start_soon(stop_and_check)
        group.start_soon(stop_and_check)


async def test_stopping_while_the_model_loads_stops_what_start_then_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shutdown hook may stop the engine before start() is done: start() then stops what it
    built and says so, rather than leaving actors and a model thread running nobody can stop."""
    import medha.engine_setup

    loading, release = threading.Event(), threading.Event()
    build = medha.engine_setup.build_engine_parts

    def slow_build(*args: object, **kwargs: object) -> object:
        loading.set()
        release.wait(10)
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(medha.engine_setup, "build_engine_parts", slow_build)
    engine = medha.Engine(engine_config())
    starting = asyncio.get_running_loop().create_task(engine.start())
    with anyio.fail_after(10):
        while not loading.is_set():
            await anyio.sleep(0.005)
    await engine.stop()
    release.set()
    with pytest.raises(EngineClosedError, match="stopped while it started"):
        await starting
    host_task = engine._host._task  # type: ignore[union-attr]
    assert host_task is not None and host_task.done()
    model_thread = engine._model_thread.thread  # type: ignore[union-attr]
    assert model_thread is not None
    await anyio.to_thread.run_sync(model_thread.join, 10)
    assert not model_thread.is_alive()


async def test_a_stream_iterated_on_another_loop_is_refused_there() -> None:
    async with medha.Engine(engine_config()) as engine:
        stream = engine.stream("made here", SHORT)

        async def iterate() -> None:
            async for _ in stream:
                pass

        assert isinstance(await _error_on_another_loop(iterate), WrongEventLoopError)
        assert (await engine.generate("from home", SHORT)).finish_reason == "length"
        assert engine.stats().running == 0


@contextlib.contextmanager
def _pythons_ctrl_c_handler() -> Iterator[None]:
    """Python's own SIGINT handler, as a script has it: a process started in the background by
    a shell without job control (`cmd &`, as CI runners may) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupting_llm_generate_aborts_its_requests() -> None:
    """Ctrl-C in a script or a notebook: the requests of the interrupted call stop and free their
    KV; they do not run on beside the next call."""
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    with _pythons_ctrl_c_handler(), medha.LLM(engine_config()) as llm:

        def stats() -> medha.EngineStats:
            return llm._runtime.portal.call(llm.engine.stats)

        def interrupt_once_running() -> None:
            deadline = time.monotonic() + 20
            while stats().running < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

        interrupter = threading.Thread(target=interrupt_once_running)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[1, 2, 3], [4, 5, 6]], params)
        interrupter.join()
        deadline = time.monotonic() + 10
        while stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        after = stats()
        assert after.running == 0 and after.free_blocks == after.total_blocks
        assert after.aborted == 2
        assert [r.finish_reason for r in llm.generate(["next"], SHORT)] == ["length"]


async def test_an_idle_engine_keeps_no_state_of_finished_requests() -> None:
    """The stage forgets a request once it is done, when the engine goes idle; not with some
    later request's plan (a worker's block tables and sampling state linger otherwise)."""
    async with medha.Engine(engine_config()) as engine:
        async with anyio.create_task_group() as group:
            for prompt in ("one", "two", "three"):
                group.start_soon(engine.generate, prompt, SHORT)
        stage = engine._stage  # type: ignore[union-attr]
        with anyio.fail_after(5):
            while stage._seqs:
                await anyio.sleep(0.01)
        assert engine._actor().scheduler.stats().finished == 3


async def test_stopping_while_the_actors_start_is_a_close_not_a_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stop() after the actor host's task is made but before its first step: start() still
    ends with EngineClosedError, not a CancelledError out of a task nobody cancelled."""
    from medha.actors.host import ActorHost

    start_host = ActorHost.start
    engine = medha.Engine(engine_config())

    async def start_then_stop(self: ActorHost, loops: Any) -> None:
        inner = asyncio.get_running_loop().create_task(start_host(self, loops))
        await asyncio.sleep(0)  # the host task exists and has not run yet
        assert self._task is not None and not self._task.done()
        await engine.stop()
        await inner

    monkeypatch.setattr(ActorHost, "start", start_then_stop)
    with pytest.raises(EngineClosedError, match="stopped while it started"):
        await engine.start()
    host_task = engine._host._task  # type: ignore[union-attr]
    assert host_task is not None and host_task.done()


async def test_a_stopped_engine_frees_its_model_and_kv_cache_at_once() -> None:
    # Without the cycle collector: the stopped actor tasks' tracebacks reach the stage, so
    # only dropping the runner at stop frees it before a later collection (or never, on a
    # process that turned the collector off), and with the caller still holding the engine.
    engine = medha.Engine(engine_config())
    gc.disable()
    try:
        async with engine:
            await engine.generate("hello", SHORT)
            runner = weakref.ref(engine._stage.runner)  # type: ignore[union-attr]
            kv = weakref.ref(engine._stage.runner.kv_cache)  # type: ignore[union-attr]
        assert runner() is None and kv() is None
    finally:
        gc.enable()


async def test_a_stopped_engine_leaves_no_actor_mailbox_open() -> None:
    # An open anyio stream warns when collected (ResourceWarning: an error under -W error).
    async with medha.Engine(engine_config()) as engine:
        await engine.generate("hello", SHORT)
        actors = [engine._scheduler_actor, engine._stage]
    for actor in actors:
        assert actor is not None
        assert actor._send._closed and actor._receive._closed, type(actor).__name__


def test_starting_without_an_asyncio_loop_says_the_engine_runs_on_asyncio() -> None:
    # What trio looks like to the engine: a coroutine run with no asyncio loop around it.
    engine = medha.Engine(engine_config())
    starting = engine.start()
    with pytest.raises(WrongEventLoopError, match="runs on asyncio"):
        starting.send(None)
    starting.close()


async def test_request_times_are_on_the_engines_clock() -> None:
    made_after = time.monotonic()
    engine = medha.Engine(engine_config())
    made_before = time.monotonic()
    async with engine:
        before = engine.now()
        done = await engine.generate([5, 6, 7], SHORT)
        after = engine.now()
        assert before <= done.metrics.arrival <= done.metrics.first_token_time <= after
        # Seconds since the Engine was made, on time.monotonic.
        now = time.monotonic()
        assert now - made_before <= engine.now() <= now - made_after + 0.01


@pytest.mark.parametrize("pausing", [False, True], ids=["unpaused", "paused"])
async def test_an_aborted_requests_id_is_free_once_abort_returns(pausing: bool) -> None:
    """As vLLM's AsyncLLM.abort: a caller that aborts and resubmits under the same id (a
    retry) is not refused; the old stream still ends with its abort event."""
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config(pause_iterations=pausing)) as engine:
        old = engine.stream([5, 6, 7], long, request_id="A")
        await old.__anext__()  # submitted, and running
        await engine.abort("A")
        again = await engine.generate([5, 6, 7], SHORT, request_id="A")
        ended = [event async for event in old]
        stats = engine.stats()
    assert len(again.token_ids) == 6 and again.finish_reason == "length"
    assert ended[-1].finish_reason == "abort" and len(ended) < 199
    assert stats.aborted == 1 and stats.free_blocks == stats.total_blocks


async def test_streams_that_never_run_leave_no_queue_open() -> None:
    """A stream dropped unstarted, one aborted before it started, one iterated on another
    loop, one iterated after the engine stopped: none leaves an anyio stream open to warn
    (ResourceWarning, an error under -W error), and the refused ones free their ids."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with medha.Engine(engine_config()) as engine:
            dropped = engine.stream([1, 2, 3], SHORT)
            del dropped
            aborted = engine.stream([1, 2, 3], SHORT, request_id="a")
            await engine.abort("a")
            del aborted
            elsewhere = engine.stream([1, 2, 3], SHORT, request_id="b")
            with pytest.raises(WrongEventLoopError):
                await anyio.to_thread.run_sync(asyncio.run, _drain(elsewhere))
            assert (await engine.generate([1, 2, 3], SHORT, request_id="b")).token_ids
            del elsewhere
            late = engine.stream([1, 2, 3], SHORT)
        with pytest.raises(EngineClosedError):
            await _drain(late)
        del late
        gc.collect()
    unclosed = [str(w.message) for w in caught if "MemoryObject" in str(w.message)]
    assert unclosed == []


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_a_start_cancelled_as_its_actors_start_keeps_no_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = medha.Engine(engine_config())
    await start_cancelled_as_its_actors_start(engine, monkeypatch)
    assert engine._stage is not None and engine._stage._runner is None
    with pytest.raises(EngineClosedError):
        engine.stats()
    await engine.stop()
