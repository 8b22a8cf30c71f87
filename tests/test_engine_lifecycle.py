"""An engine's life among the caller's tasks: stopping it from another task ends the caller's
pending calls with EngineClosedError and never cancels the caller; engines stop in any order;
closing under open streams is never reported as a failure; a request id is free again once its
request has ended, and a stream that ends late cannot abort the id's next request; the engine
refuses calls from a loop it does not run on; medha.LLM validates a whole batch first."""

from __future__ import annotations

import asyncio
import threading

import anyio
import numpy as np
import pytest

import medha
from medha import EngineClosedError, InvalidRequestError, SamplingParams
from medha.errors import WrongEventLoopError
from tests.engine_support import engine_config

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


async def test_calls_from_another_event_loop_are_refused_at_once() -> None:
    outcome: list[BaseException] = []
    async with medha.Engine(engine_config()) as engine:

        def other_thread() -> None:
            async def use() -> None:
                await engine.generate("from elsewhere", SHORT)

            try:
                asyncio.run(use())
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join, 10)
        assert (await engine.generate("from home", SHORT)).finish_reason == "length"
    assert len(outcome) == 1 and isinstance(outcome[0], WrongEventLoopError)


async def test_numpy_token_ids_are_a_prompt() -> None:
    async with medha.Engine(engine_config()) as engine:
        plain = await engine.generate([5, 6, 7], SHORT)
        numpy = await engine.generate(list(np.array([5, 6, 7], dtype=np.int64)), SHORT)
    assert numpy.token_ids == plain.token_ids
    assert all(type(token) is int for token in numpy.prompt_token_ids)


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
