"""Prefix caching across processes: with SPP over two stages and KVP over two groups, a shared
prefix longer than one group's share is reused from both groups' caches, a next turn reuses the
block an answer filled, and every output
equals the single-process engine's without a cache (greedy, seeded and penalised). The engine's
metrics count the pipeline's work."""

from __future__ import annotations

import random

import pytest

import medha
from medha import SamplingParams
from tests.parallel_support import KVP_TOKENS, parallel_config

pytestmark = pytest.mark.anyio

# Longer than one KVP group's share: the cached prefix spans both groups.
PREFIX = [random.Random(1).randrange(503) for _ in range(KVP_TOKENS + 40)]
PROMPTS = [
    [*PREFIX, *[random.Random(10 + i).randrange(503) for _ in range(3 + i)]] for i in range(4)
]
PARAMS = [
    SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _one_by_one(engine: medha.Engine) -> list[medha.Completion]:
    """Every prompt, then the first one's next turn (its prompt and answer, and more)."""
    answers = [
        await engine.generate(prompt, params)
        for prompt, params in zip(PROMPTS, PARAMS, strict=True)
    ]
    next_turn = [*PROMPTS[0], *answers[0].token_ids, 5, 6]
    answers.append(await engine.generate(next_turn, PARAMS[0]))
    return answers


async def test_a_prefix_spanning_two_kvp_groups_is_reused_across_processes() -> None:
    async with medha.Engine(parallel_config(1, 2, 2), record_iterations=True) as engine:
        cached = await _one_by_one(engine)
        stats = engine.stats()
        in_flight = sum(record.seconds for record in engine.iteration_history)
        metrics = engine.metrics.registry
        label = {"model_name": engine.metrics.model_name}
    # Three later prompts, each taking the prefix's 8 full blocks (128 tokens); the next turn
    # takes 9 (144 tokens), the last one filled by the first answer, on the second group.
    assert stats.prefix_cache_hit_tokens == 3 * 128 + 144
    assert [done.metrics.cached_tokens for done in cached] == [0, 128, 128, 128, 144]
    # The engine's metrics count a pipeline's work as the single process's.
    prompt_tokens = sum(map(len, PROMPTS)) + len(PROMPTS[0]) + 6 + 2
    computed = metrics.get_sample_value("medha:prefill_tokens_computed_total", label)
    assert computed == prompt_tokens - stats.prefix_cache_hit_tokens
    assert metrics.get_sample_value("medha:prompt_tokens_total", label) == prompt_tokens
    assert metrics.get_sample_value("medha:generation_tokens_total", label) == 5 * 6
    assert metrics.get_sample_value("medha:iteration_seconds_count", label) == stats.iterations
    # An iteration's time there is its slowest stage's, less than its time in flight.
    stage_seconds = metrics.get_sample_value("medha:iteration_seconds_sum", label)
    assert stage_seconds is not None and 0 < stage_seconds < in_flight
    assert stats.free_blocks == stats.total_blocks
    single = parallel_config(1, 1, 1, num_blocks=256, enable_prefix_caching=False)
    async with medha.Engine(single) as engine:
        alone = await _one_by_one(engine)
    assert [done.token_ids for done in alone] == [done.token_ids for done in cached]
