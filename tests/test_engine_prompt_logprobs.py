"""SamplingParams.prompt_logprobs through the engine: each prompt token's log-probability (and the
most likely tokens at its position) equal HF transformers' log_softmax of the same weights,
however the prompt was chunked, interleaved with other requests or preempted and recomputed;
a scoring request computes its whole prompt (no prefix cache hit) but fills the cache, and its
steps are priced with the LM head on every row. The multi-process layouts are covered in
tests/test_parallel_exactness.py."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import anyio
import pytest

import medha
from medha import SamplingParams
from medha.actors.scheduler_actor import SchedulerActor
from medha.actors.tracked import TrackedRequest
from medha.scheduler import SeqShape
from tests.parallel_support import assert_prompt_logprobs_equal_hf, hf_greedy, parallel_config

pytestmark = pytest.mark.anyio

VOCAB = 503


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


async def _generate_all(
    engine: medha.Engine, work: list[tuple[list[int], SamplingParams]]
) -> list[medha.Completion]:
    results: list[Any] = [None] * len(work)

    async def one(i: int) -> None:
        await anyio.sleep(0.002 * i)
        results[i] = await engine.generate(work[i][0], work[i][1], request_id=f"r{i}")

    async with anyio.create_task_group() as group:
        for i in range(len(work)):
            group.start_soon(one, i)
    return results


def _mixed_work(count: int, max_tokens: int) -> list[tuple[list[int], SamplingParams]]:
    """Every other request scores its prompt (top 0, 2 or 5); the others only generate."""
    work = []
    for i in range(count):
        scores = [0, 2, 5][i // 2 % 3] if i % 2 == 0 else None
        params = SamplingParams.greedy(max_tokens, ignore_eos=True, prompt_logprobs=scores)
        work.append((_prompt(i, 60 + 23 * i), params))
    return work


async def test_prompt_logprobs_equal_hf_across_chunks_and_interleaving() -> None:
    work = _mixed_work(6, max_tokens=5)
    # Chunks of at most 32 tokens: a prompt's last row in a chunk scores the next chunk's first
    # token.
    config = parallel_config(1, 1, 1, num_blocks=256, max_chunk=32)
    async with medha.Engine(config, record_iterations=True) as e:
        done = await _generate_all(e, work)
        history = e.iteration_history
        assert e.stats().free_blocks == e.stats().total_blocks
    for (prompt, params), completion in zip(work, done, strict=True):
        if params.prompt_logprobs is None:
            assert completion.prompt_logprobs is None and completion.prompt_top_logprobs is None
        else:
            assert_prompt_logprobs_equal_hf(completion, params.prompt_logprobs)
        # Scoring changes nothing of what is generated.
        assert completion.token_ids == hf_greedy(prompt, params.max_tokens or 0)
    # The scored prompts were computed in several chunks, sharing iterations with the others.
    chunks = {
        f"r{i}": sum(1 for r in history for seq in r.tokens if seq[0] == f"r{i}" and seq[2])
        for i in (0, 2, 4)
    }
    assert all(count >= 2 for count in chunks.values()), chunks
    assert any(len(record.tokens) > 1 for record in history)


async def test_the_first_streamed_event_carries_the_prompt_logprobs() -> None:
    prompt = _prompt(11, 70)
    params = SamplingParams.greedy(4, ignore_eos=True, prompt_logprobs=1)
    async with medha.Engine(parallel_config(1, 1, 1, num_blocks=256)) as engine:
        events = [event async for event in engine.stream(prompt, params)]
        completion = await engine.generate(prompt, params)
        one_token = await engine.generate([7], params)
    assert len(events) == 4
    first = events[0]
    assert first.prompt_logprobs == tuple(completion.prompt_logprobs or ())
    assert first.prompt_top_logprobs == tuple(completion.prompt_top_logprobs or ())
    assert all(e.prompt_logprobs is None and e.prompt_top_logprobs is None for e in events[1:])
    assert_prompt_logprobs_equal_hf(completion, 1)
    # Nothing comes before a prompt's first token.
    assert one_token.prompt_logprobs == [None] and one_token.prompt_top_logprobs == [None]


async def test_prompt_logprobs_survive_preemption_by_recompute() -> None:
    # Twelve scoring requests of up to 160 tokens in 16 blocks (256 tokens): their decodes
    # evict others, which recompute, and every prompt token is still scored exactly once.
    params = SamplingParams.greedy(60, ignore_eos=True, prompt_logprobs=2)
    work = [(_prompt(100 + i, 30 + 7 * i), params) for i in range(12)]
    async with medha.Engine(parallel_config(1, 1, 1, num_blocks=16)) as engine:
        done = await _generate_all(engine, work)
        stats = engine.stats()
    assert stats.preemptions > 0, "the small cache never forced a preemption"
    assert stats.free_blocks == stats.total_blocks
    for (prompt, _), completion in zip(work, done, strict=True):
        assert_prompt_logprobs_equal_hf(completion, 2)
        assert completion.token_ids == hf_greedy(prompt, 60)


async def test_a_scoring_request_computes_its_whole_prompt_and_fills_the_cache() -> None:
    prompt = _prompt(21, 130)
    plain = SamplingParams.greedy(3, ignore_eos=True)
    scoring = SamplingParams.greedy(3, prompt_logprobs=0)
    config = parallel_config(1, 1, 1, num_blocks=256, enable_prefix_caching=True)
    async with medha.Engine(config) as engine:
        await engine.generate(prompt, plain)  # caches the prompt's 8 full blocks
        before = engine.stats().prefix_cache_hit_tokens
        scored = await engine.generate(prompt, scoring)
        after_scoring = engine.stats().prefix_cache_hit_tokens
        await engine.generate(prompt, plain)
        after_plain = engine.stats().prefix_cache_hit_tokens
    assert after_scoring == before, "the scoring request took cached blocks"
    assert after_plain - after_scoring == 128
    assert_prompt_logprobs_equal_hf(scored, 0)
    # As vLLM: it takes nothing from the cache but fills it, for a question after the scoring.
    async with medha.Engine(config) as engine:
        await engine.generate(prompt, scoring)
        assert engine.stats().prefix_cache_hit_tokens == 0
        follow_up = await engine.generate([*prompt, 5, 6, 7], plain)
        assert engine.stats().prefix_cache_hit_tokens == 128
    assert follow_up.token_ids == hf_greedy([*prompt, 5, 6, 7], 3)


async def test_a_gap_in_the_prompt_logprobs_ends_only_that_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug that skipped a row to score would fail that request alone, not the engine.
    rows = TrackedRequest.score_rows

    def skips_the_first(self: TrackedRequest, start: int, end: int) -> range:
        wanted = rows(self, start, end)
        return wanted[1:] if self.request_id == "bad" else wanted

    monkeypatch.setattr(TrackedRequest, "score_rows", skips_the_first)
    params = SamplingParams.greedy(20, ignore_eos=True, prompt_logprobs=1)
    async with medha.Engine(parallel_config(1, 1, 1, num_blocks=256, max_chunk=32)) as engine:
        with anyio.fail_after(60):
            bad, good = await asyncio.gather(
                engine.generate(_prompt(1, 80), params, request_id="bad"),
                engine.generate(_prompt(2, 80), params, request_id="good"),
                return_exceptions=True,
            )
        stats = engine.stats()
    assert isinstance(bad, RuntimeError) and "only the first 1 are known" in str(bad)
    assert isinstance(good, medha.Completion) and len(good.token_ids) == 20
    assert_prompt_logprobs_equal_hf(good, 1)
    assert stats.free_blocks == stats.total_blocks


async def test_a_prompt_preempted_halfway_through_scores_each_token_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long scoring prompt (lax deadline: the least urgent prefill) starts first, in 32-token
    # chunks, and reserves 38 of the 46 blocks; six urgent chats take 6 more, cross a block
    # boundary within a few tokens, and a decode short of memory evicts the part-way prefill,
    # which later recomputes its prompt from the start.
    halfway: list[int] = []
    schedule = SchedulerActor._schedule

    def watching(self: SchedulerActor) -> Any:
        plan = schedule(self)
        for request_id in plan.preempted:
            request = self.requests.get(request_id)
            if request is not None and request.params.prompt_logprobs is not None:
                halfway.append(len(request.prompt_logprobs))
        return plan

    monkeypatch.setattr(SchedulerActor, "_schedule", watching)
    chat = SamplingParams.greedy(80, ignore_eos=True)
    scoring = SamplingParams.greedy(3, ignore_eos=True, prompt_logprobs=2)
    work = [(_prompt(400, 600), scoring, 60.0)]
    work += [(_prompt(300 + i, 12 + i), chat, None) for i in range(6)]
    results: list[Any] = [None] * len(work)
    async with medha.Engine(parallel_config(1, 1, 1, num_blocks=46, max_chunk=32)) as engine:

        async def one(i: int) -> None:
            await anyio.sleep(0.003 * i)
            prompt, params, deadline = work[i]
            results[i] = await engine.generate(prompt, params, deadline)

        async with anyio.create_task_group() as group:
            for i in range(len(work)):
                group.start_soon(one, i)
        stats = engine.stats()
    assert any(1 < scored < 600 for scored in halfway), halfway
    assert stats.free_blocks == stats.total_blocks
    for (prompt, params, _), completion in zip(work, results, strict=True):
        if params.prompt_logprobs is not None:
            assert_prompt_logprobs_equal_hf(completion, 2)
        assert completion.token_ids == hf_greedy(prompt, params.max_tokens or 0)


async def test_scoring_steps_are_priced_with_their_lm_head() -> None:
    # Each chunk of a scored prompt runs the LM head on every row: its plan is priced so
    # (SeqShape.head_rows), which keeps its chunks to the budget and lets what it measures
    # teach the online time scale like any other step (off here: prices stay as calibrated).
    config = parallel_config(1, 1, 1, num_blocks=256, max_chunk=32, online_time_scale=False)
    async with medha.Engine(config, record_iterations=True) as engine:
        cost = engine._actor().scheduler.cost
        await engine.generate(_prompt(5, 150), SamplingParams.greedy(1, prompt_logprobs=0))
        history = engine.iteration_history
    start = 0
    for record in history:
        ((_, rows, is_prefill),) = record.tokens
        if not is_prefill:
            continue
        scored = cost.batch_time([SeqShape(rows, start, 1, rows)])
        assert record.predicted_seconds == pytest.approx(scored)
        assert scored > cost.batch_time([SeqShape(rows, start)])
        start += rows
    assert start == 150


async def test_scoring_steps_teach_the_online_time_scale() -> None:
    config = parallel_config(1, 1, 1, num_blocks=256, max_chunk=32, online_time_scale=True)
    async with medha.Engine(config) as engine:
        start = engine.stats().time_scale
        await engine.generate(_prompt(5, 150), SamplingParams.greedy(1, prompt_logprobs=0))
        assert engine.stats().time_scale != start
