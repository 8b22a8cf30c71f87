"""A failing model step ends every open stream with EngineFailedError, and nothing else: the
caller's task is not cancelled (the engine's task group lives in it), later requests fail fast
with the same error, and leaving the engine is clean."""

from __future__ import annotations

import threading

import anyio
import pytest

import medha
from medha import EngineFailedError
from tests.engine_support import StreamsUntilFailure, engine_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_failing_step_fails_every_stream_but_not_the_caller() -> None:
    streams = StreamsUntilFailure(max_tokens=400)
    async with medha.Engine(engine_config()) as engine:
        async with anyio.create_task_group() as group:
            streams.start(group, engine)
            await streams.wait_streaming()
            runner = engine._stage.runner  # type: ignore[union-attr]

            def broken_step(*args: object, **kwargs: object) -> None:
                raise RuntimeError("device lost")

            runner.start_step = broken_step  # where every engine step begins
            await streams.wait_failed()
        # Still here: this task was not cancelled. New requests fail at once, not hang.
        with anyio.fail_after(5), pytest.raises(EngineFailedError):
            await engine.generate([1, 2, 3], streams.params)
    assert max(streams.counts) < streams.params.max_tokens
    # The step's own error, not wrapped (in an ExceptionGroup, say) on its way.
    assert all(
        type(e.__cause__) is RuntimeError and str(e.__cause__) == "device lost"
        for e in streams.errors
    )


async def test_a_stream_started_while_the_failing_step_runs_fails_too() -> None:
    """Its request is still in the scheduler's mailbox (without pausing, nothing is read while a
    step runs): it ends with the engine's failure, not as if the engine had been closed."""
    streams = StreamsUntilFailure(max_tokens=400)
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def late_stream(engine: medha.Engine) -> None:
        try:
            async for _ in engine.stream([4, 5, 6], streams.params):
                pass
        except Exception as error:
            errors.append(error)

    async with (
        medha.Engine(engine_config(pause_iterations=False)) as engine,
        anyio.create_task_group() as group,
    ):
        streams.start(group, engine)
        await streams.wait_streaming()
        runner = engine._stage.runner  # type: ignore[union-attr]

        def failing_step(*args: object, **kwargs: object) -> None:
            entered.set()
            release.wait(10)
            raise RuntimeError("device lost")

        runner.start_step = failing_step
        with anyio.fail_after(10):
            while not entered.is_set():
                await anyio.sleep(0.005)
        group.start_soon(late_stream, engine)
        await anyio.sleep(0.1)  # the late stream submits; the loop is idle otherwise
        release.set()
        await streams.wait_failed()
    assert len(errors) == 1
    assert type(errors[0]) is EngineFailedError
    assert type(errors[0].__cause__) is RuntimeError and str(errors[0].__cause__) == "device lost"
    # The engine's metrics count every failed stream once, the late one too.
    ended = engine.metrics.registry.get_sample_value(
        "medha:request_success_total",
        {"model_name": engine.metrics.model_name, "finished_reason": "error"},
    )
    assert ended == len(streams.counts) + 1
