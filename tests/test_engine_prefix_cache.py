"""Prefix caching through the engine: requests that share a document, a conversation's next
turns (which reuse the earlier answers too), penalised and seeded requests, preempted requests
that find their own output's blocks, and a cache too small to keep everything give the same
outputs as an engine without the cache, while computing fewer tokens."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import anyio
import pytest

import medha
from medha import SamplingParams
from medha.actors.tracked import TrackedRequest
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

DOCUMENT = [random.Random(5).randrange(4, 500) for _ in range(400)]
QUESTIONS = [[random.Random(q).randrange(4, 500) for _ in range(20 + 7 * q)] for q in range(6)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _params(i: int, max_tokens: int = 24) -> SamplingParams:
    kinds: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"temperature": 0.9, "seed": 40 + i},
        {"temperature": 0.0, "repetition_penalty": 1.3, "frequency_penalty": 0.4},
    ]
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kinds[i % len(kinds)])


async def _ask_all(engine: medha.Engine, together: bool) -> dict[str, medha.Completion]:
    """Every question about the document: one after the other (each hits what the earlier
    ones computed), or all at once (the first computes it while the others wait)."""
    prompts = [[*DOCUMENT, *question] for question in QUESTIONS]
    results: dict[str, medha.Completion] = {}

    async def one(i: int) -> None:
        results[f"q{i}"] = await engine.generate(prompts[i], _params(i), request_id=f"q{i}")

    if together:
        async with anyio.create_task_group() as group:
            for i in range(len(prompts)):
                group.start_soon(one, i)
    else:
        for i in range(len(prompts)):
            await one(i)
    return results


def _tokens(done: dict[str, medha.Completion]) -> dict[str, list[int]]:
    return {request_id: completion.token_ids for request_id, completion in done.items()}


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "concurrent"])
async def test_questions_about_one_document_match_an_engine_without_the_cache(
    together: bool,
) -> None:
    async with medha.Engine(engine_config(enable_prefix_caching=False)) as engine:
        expected = await _ask_all(engine, together)
        assert engine.stats().prefix_cache_hit_tokens == 0
    assert {done.metrics.cached_tokens for done in expected.values()} == {0}
    async with medha.Engine(engine_config(target_batch_time=0.003)) as engine:
        cached = await _ask_all(engine, together)
        stats = engine.stats()
    assert _tokens(cached) == _tokens(expected)
    # Each request's share of the hits (no request here is preempted: each hits once).
    hits = [cached[f"q{i}"].metrics.cached_tokens for i in range(len(QUESTIONS))]
    assert sum(hits) == stats.prefix_cache_hit_tokens
    if not together:
        assert hits == [0] + [400] * (len(QUESTIONS) - 1)
    if together:
        # Each later question takes most of the document from the cache: it waits, or queues,
        # while the first computes it (the last block or so it may compute itself).
        assert stats.prefix_cache_hit_tokens >= 5 * 300
    else:  # 5 later questions x 25 blocks of the 400-token document
        assert stats.prefix_cache_hit_tokens == 5 * 400
    assert stats.cached_blocks > 0
    assert stats.free_blocks == stats.total_blocks  # cached blocks nobody uses are free


async def test_a_conversations_next_turns_reuse_the_earlier_prompts_and_answers() -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def converse(engine: medha.Engine) -> list[list[int]]:
        context = [*DOCUMENT[:100], 7, 8, 9]
        answers = []
        for turn in range(3):
            answer = (await engine.generate(context, params)).token_ids
            answers.append(answer)
            context = [*context, *answer, 11, 12 + turn]
        return answers

    async with medha.Engine(engine_config(enable_prefix_caching=False)) as engine:
        expected = await converse(engine)
    async with medha.Engine(engine_config()) as engine:
        assert await converse(engine) == expected
        stats = engine.stats()
    # Each turn's KV is computed up to its answer's last token (never fed back): turn one's
    # 142 tokens hold 8 full blocks, turn two's 184 hold 11, and each next turn takes them
    # all, answers included (prompt blocks alone would be 6, then 9).
    assert stats.prefix_cache_hit_tokens == (8 + 11) * 16


async def test_a_cache_too_small_to_keep_every_document_evicts_and_stays_exact() -> None:
    # 40 blocks (640 tokens): each 400-token document pushes part of the other out.
    documents = [[random.Random(d).randrange(4, 500) for _ in range(400)] for d in (1, 2)]
    prompts = [[*documents[i % 2], 3, 4, 5 + i] for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def run(engine: medha.Engine) -> list[list[int]]:
        return [(await engine.generate(p, params)).token_ids for p in prompts]

    async with medha.Engine(engine_config(enable_prefix_caching=False)) as engine:
        expected = await run(engine)
    async with medha.Engine(engine_config(num_blocks=40)) as engine:
        assert await run(engine) == expected
        stats = engine.stats()
    # Each document loses its tail to the other (tails go first, so what stays is a prefix)
    # and comes back to a partial hit.
    assert 0 < stats.prefix_cache_hit_tokens < 4 * 400
    assert stats.free_blocks == stats.total_blocks == 40


async def test_requests_with_a_hit_survive_preemption_by_recompute() -> None:
    # 34 blocks: the document's 25 shared blocks plus a few of each question's own; decodes
    # that outgrow them evict requests that hold shared blocks, which recompute (and may hit
    # again).
    async with medha.Engine(engine_config(enable_prefix_caching=False)) as engine:
        expected = _tokens(await _ask_all(engine, together=True))
    async with medha.Engine(engine_config(num_blocks=34, target_batch_time=0.003)) as engine:
        cached = _tokens(await _ask_all(engine, together=True))
        stats = engine.stats()
    assert stats.preemptions > 0, "the small cache never forced a preemption"
    assert stats.prefix_cache_hit_tokens > 0
    assert cached == expected
    assert stats.free_blocks == stats.total_blocks == 34


async def test_preempted_requests_recompute_past_their_own_cached_output() -> None:
    # Prompts shorter than a block: every cached block is one an output filled. 20 blocks for
    # requests that grow to 7 and 2 blocks: decodes preempt one, which finds its own computed
    # blocks again when the short ones finish soon after.
    prompts = [[random.Random(p).randrange(4, 500) for _ in range(5 + p)] for p in range(6)]

    async def run(engine: medha.Engine) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in prompts]

        async def one(i: int) -> None:
            params = _params(i, max_tokens=100 if i % 2 == 0 else 20)
            results[i] = (await engine.generate(prompts[i], params)).token_ids

        async with anyio.create_task_group() as group:
            for i in range(len(prompts)):
                group.start_soon(one, i)
        return results

    def computed(engine: medha.Engine) -> float | None:
        assert engine.metrics is not None
        labels = {"model_name": engine.metrics.model_name}
        return engine.metrics.registry.get_sample_value(
            "medha:prefill_tokens_computed_total", labels
        )

    async with medha.Engine(engine_config(num_blocks=20, enable_prefix_caching=False)) as engine:
        expected = await run(engine)
        uncached = engine.stats(), computed(engine)
    async with medha.Engine(engine_config(num_blocks=20)) as engine:
        cached = await run(engine)
        stats = engine.stats(), computed(engine)
    assert stats[0].preemptions > 0 and uncached[0].preemptions > 0, "no preemption forced"
    assert cached == expected
    # Its own blocks found again are no prefix-cache hit (no prompt shares another's: each
    # request's cached_tokens is 0), but the recompute is shorter.
    assert stats[0].prefix_cache_hit_tokens == 0
    assert stats[1] is not None and uncached[1] is not None and stats[1] < uncached[1]
    assert stats[0].free_blocks == stats[0].total_blocks == 20


async def test_digests_the_scheduler_refuses_end_only_their_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug that made the engine hash a block too many would fail that request alone.
    hashed = TrackedRequest.new_block_hashes

    def one_too_many(self: TrackedRequest) -> tuple[bytes, ...]:
        digests = hashed(self)
        return (*digests, b"\0" * 32) if digests and self.request_id == "bad" else digests

    monkeypatch.setattr(TrackedRequest, "new_block_hashes", one_too_many)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        with anyio.fail_after(60):
            bad, good = await asyncio.gather(
                engine.generate(DOCUMENT[:30], params, request_id="bad"),
                engine.generate(DOCUMENT[:30], params, request_id="good"),
                return_exceptions=True,
            )
        stats = engine.stats()
    assert isinstance(bad, medha.errors.InvalidRequestError)
    assert isinstance(good, medha.Completion) and len(good.token_ids) == 40
    assert stats.free_blocks == stats.total_blocks


async def test_only_requests_with_one_cache_salt_share_blocks() -> None:
    """vLLM's cache_salt: a tenant's requests share their prefixes with each other, never with
    another tenant's or unsalted ones, whose timing would tell them apart (a hit is faster).
    The output's blocks chain from the salt too: a prompt shorter than a block has none of its
    own, and the next turn still hits only under the same salt."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    document = [*DOCUMENT[:100], 7]
    short = DOCUMENT[:5]
    async with medha.Engine(engine_config()) as engine:

        async def hit(prompt: list[int], salt: str | None) -> int:
            done = await engine.generate(prompt, params, cache_salt=salt)
            return done.metrics.cached_tokens

        assert await hit(document, "tenant-a") == 0
        assert await hit(document, "tenant-b") == 0  # another salt: computed again
        assert await hit(document, None) == 0
        assert await hit(document, "tenant-a") == 96  # its 6 whole blocks
        assert await hit(document, None) == 96
        answer = (await engine.generate(short, params, cache_salt="tenant-a")).token_ids
        next_turn = [*short, *answer, 11]
        assert await hit(next_turn, "tenant-b") == 0
        assert await hit(next_turn, "tenant-a") == 32  # the answer's 2 whole blocks
        for bad in ("", 5, "caf\udce9"):
            with pytest.raises(medha.InvalidRequestError, match="cache_salt"):
                engine.stream(document, params, cache_salt=bad)  # type: ignore[arg-type]
        stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks


async def test_a_long_prompt_prepared_off_the_loop_keeps_its_cache_salt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.engine_support import long_from

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    document = [*DOCUMENT[:100], 7]
    async with medha.Engine(engine_config()) as engine:
        await engine.generate(document, params, cache_salt="tenant-a")
        long_from(monkeypatch, 10)  # prompts over 10 tokens are prepared off the loop
        same = await engine.generate(document, params, cache_salt="tenant-a")
        other = await engine.generate(document, params, cache_salt="tenant-b")
    assert (same.metrics.cached_tokens, other.metrics.cached_tokens) == (96, 0)
