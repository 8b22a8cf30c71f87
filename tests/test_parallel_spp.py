"""Stream pipeline parallelism across processes: with pp=2 the next chunk of a prompt enters stage
0 while its previous chunk is still in stage 1 (two chunks of one request in flight at once),
and the output is still exact; without SPP a prompt's chunks never overlap."""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import pytest

import medha
from medha import SamplingParams
from medha.actors.scheduler_messages import IterationRecord
from tests.parallel_support import parallel_config, single_process_greedy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _overlapping_chunks(history: list[IterationRecord], request_id: str) -> int:
    """Pairs of prefill chunks of `request_id` whose time in the pipeline overlapped."""
    spans = [
        (r.started, r.started + r.seconds)
        for r in history
        if any(rid == request_id and prefill for rid, _, prefill in r.tokens)
    ]
    spans.sort()
    return sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])


class _Run(NamedTuple):
    prompt: list[int]
    tokens: list[int]
    chunks: int
    overlaps: int
    max_in_flight: int


async def _long_prompt_run(spp: bool) -> _Run:
    prompt = [random.Random(5).randrange(503) for _ in range(600)]
    # A tiny budget makes 32-token chunks: many chunks of one prompt.
    config = parallel_config(
        1, 2, 1, target_batch_time=0.001, max_chunk=64, num_blocks=128
    ).model_copy(update={"parallel": medha.ParallelConfig(pp=2, spp=spp)})
    async with medha.Engine(config, record_iterations=True) as engine:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        done = await engine.generate(prompt, params, request_id="long")
        history = engine.iteration_history
        actor = engine._scheduler_actor
        in_flight = actor.max_plans_in_flight  # type: ignore[union-attr]
    chunks = sum(1 for r in history for _, _, prefill in r.tokens if prefill)
    overlaps = _overlapping_chunks(history, "long")
    return _Run(prompt, done.token_ids, chunks, overlaps, in_flight)


async def test_spp_has_two_chunks_of_one_prompt_in_flight_and_stays_exact() -> None:
    run = await _long_prompt_run(spp=True)
    assert run.chunks >= 4
    assert run.max_in_flight >= 2
    assert run.overlaps >= 1, "no two chunks of the prompt were ever in the pipeline together"
    assert run.tokens == single_process_greedy(run.prompt, 4)


async def test_without_spp_chunks_of_one_prompt_never_overlap() -> None:
    run = await _long_prompt_run(spp=False)
    assert run.chunks >= 4
    assert run.overlaps == 0
    assert run.tokens == single_process_greedy(run.prompt, 4)


class _GlooLikeSend:
    """An isend as gloo's: never reports completion until waited on."""

    def __init__(self, waited: list[int], index: int) -> None:
        self.waited, self.index = waited, index

    def is_completed(self) -> bool:
        return False

    def wait(self) -> bool:
        self.waited.append(self.index)
        return True


def test_a_stage_keeps_at_most_pp_sends_waiting_on_the_oldest() -> None:
    import torch

    from medha.actors.remote_stage import PendingSends

    waited: list[int] = []
    sends = PendingSends(limit=2)
    for index in range(1000):
        sends.add(_GlooLikeSend(waited, index), torch.zeros(64))
    # Every tensor but the last two sent was released, the oldest first.
    assert len(sends) == 2
    assert waited == list(range(998))
    with pytest.raises(ValueError, match="limit"):
        PendingSends(limit=0)
