"""A failing model step ends every open stream with EngineFailedError, and nothing else: the
caller's task is not cancelled (the engine's task group lives in it), later requests fail fast
with the same error, and leaving the engine is clean."""

from __future__ import annotations

import anyio
import pytest

import medha
from medha import EngineFailedError, SamplingParams
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_failing_step_fails_every_stream_but_not_the_caller() -> None:
    errors: list[BaseException] = []
    counts = [0, 0]
    both_streaming = anyio.Event()

    async def consume(engine: medha.Engine, index: int) -> None:
        try:
            async for _ in engine.stream([3 + index, 4, 5], LONG):
                counts[index] += 1
                if all(counts):
                    both_streaming.set()
        except EngineFailedError as exc:
            errors.append(exc)

    async with medha.Engine(engine_config()) as engine:
        async with anyio.create_task_group() as group:
            group.start_soon(consume, engine, 0)
            group.start_soon(consume, engine, 1)
            with anyio.fail_after(30):
                await both_streaming.wait()
            runner = engine._stage.runner  # type: ignore[union-attr]

            def broken_step(*args: object, **kwargs: object) -> None:
                raise RuntimeError("device lost")

            runner.step = broken_step
            with anyio.fail_after(10):
                while len(errors) < 2:
                    await anyio.sleep(0.01)
        # Still here: this task was not cancelled. New requests fail at once, not hang.
        with anyio.fail_after(5), pytest.raises(EngineFailedError):
            await engine.generate([1, 2, 3], LONG)
    assert max(counts) < LONG.max_tokens
    assert all("device lost" in repr(e.__cause__) for e in errors)
