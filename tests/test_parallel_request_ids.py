"""A multi-process engine handles messages while plans are in flight, so an aborted request can
outlive its stream there: a new request under the same id waits for it to retire, then runs
exactly as alone, and no KV block is left behind."""

from __future__ import annotations

import random

import anyio
import pytest

import medha
from medha import SamplingParams
from tests.parallel_support import parallel_config, single_process_greedy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_id_reused_while_its_aborted_request_is_in_flight_runs_exactly() -> None:
    rng = random.Random(3)
    first, second = ([rng.randrange(503) for _ in range(n)] for n in (40, 30))
    config = parallel_config(1, 2, 1, num_blocks=128)
    endless = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    async with medha.Engine(config) as engine:
        for _ in range(3):
            stream = engine.stream(first, endless, request_id="turn")
            for _ in range(3):
                await stream.__anext__()
            await stream.aclose()  # aborts "turn" with its next decode in the pipeline
            again = await engine.generate(second, short, request_id="turn")
            assert again.finish_reason == "length"
            assert again.token_ids == single_process_greedy(second, 6)
        with anyio.fail_after(10):
            while (stats := engine.stats()).running or stats.waiting:
                await anyio.sleep(0.01)
        assert stats.free_blocks == stats.total_blocks
