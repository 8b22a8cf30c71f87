"""Every TP x PP x KVP layout computes what one process computes: with several concurrent requests
(two of them spanning two KVP groups), greedy tokens equal the single-process runner's and HF
transformers', and every logit row the sampling worker saw is within 1e-4 of HF's.

One engine per layout (worker processes are the expensive part); layouts of 4 and 8 workers are
marked slow (they still run in `make test`)."""

from __future__ import annotations

import re

import anyio
import pytest
import torch

import medha
from medha import PromptTooLongError, SamplingParams
from tests.parallel_support import (
    KVP_TOKENS,
    assert_prompt_logprobs_equal_hf,
    hf_greedy,
    hf_logits,
    logits_by_request,
    parallel_config,
    run_concurrently,
    single_process_greedy,
    workload,
)

pytestmark = pytest.mark.anyio

LAYOUTS = [
    pytest.param((2, 1, 1), id="tp2"),
    pytest.param((1, 2, 1), id="pp2"),
    pytest.param((1, 1, 2), id="kvp2"),
    pytest.param((2, 2, 1), id="tp2-pp2", marks=pytest.mark.slow),
    pytest.param((2, 1, 2), id="tp2-kvp2", marks=pytest.mark.slow),
    pytest.param((1, 2, 2), id="pp2-kvp2", marks=pytest.mark.slow),
    pytest.param((2, 2, 2), id="tp2-pp2-kvp2", marks=pytest.mark.slow),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_layout_matches_single_process_and_hf(layout: tuple[int, int, int]) -> None:
    tp, pp, kvp = layout
    work = workload(seed=tp * 100 + pp * 10 + kvp, count=6, long_prompts=2)
    async with medha.Engine(parallel_config(tp, pp, kvp)) as engine:
        actor = engine._scheduler_actor
        actor.record_logits = True  # type: ignore[union-attr]
        scored: list[medha.Completion] = []

        async def score() -> None:
            # Prompt logprobs of a prompt that spans two KVP groups, run in chunks among the
            # others: group 0's last stage scores, its TP peers run the LM head alongside.
            params = SamplingParams.greedy(3, ignore_eos=True, prompt_logprobs=3)
            scored.append(await engine.generate(work[0][0], params, request_id="scored"))

        async with anyio.create_task_group() as group:
            group.start_soon(score)
            outputs = await run_concurrently(engine, work)
        plans = [plan for plan, _ in actor.logits_log]  # type: ignore[union-attr]
        logits = logits_by_request(actor.logits_log)  # type: ignore[union-attr]
        assert engine.stats().free_blocks == engine.stats().total_blocks
        if kvp > 1:  # a request holds at most kvp x M tokens: longer is refused up front
            assert engine.max_model_len == kvp * KVP_TOKENS
            with pytest.raises(PromptTooLongError):
                engine.stream([1] * (kvp * KVP_TOKENS), SamplingParams(max_tokens=1))
    if kvp > 1:  # the long prompts did spread: steps ran on two groups, merged
        assert any(len(seq.shards) == 2 for plan in plans for seq in plan.seqs)
    assert_prompt_logprobs_equal_hf(scored[0], 3)
    for i, ((prompt, max_tokens), tokens) in enumerate(zip(work, outputs, strict=True)):
        assert tokens == single_process_greedy(prompt, max_tokens), f"request {i}"
        assert tokens == hf_greedy(prompt, max_tokens), f"request {i}"
        # Row k predicts token k: HF's logits at position len(prompt) - 1 + k.
        rows = torch.stack(logits[f"r{i}"])
        expected = hf_logits(prompt + tokens[:-1])[len(prompt) - 1 :]
        assert rows.shape == expected.shape
        error = float((rows - expected).abs().max() / expected.abs().max())
        assert error < 1e-4, f"request {i}: relative logit error {error:.2e}"


@pytest.mark.parametrize(
    ("layout", "settings"),
    [
        pytest.param((1, 2, 1), {"max_chunk": 64}, id="pp2-small-chunks"),
        # Chunks of over 256 rows: the TP peers follow the scorer through several LM-head slices.
        pytest.param(
            (2, 2, 1),
            {"max_chunk": 512, "target_batch_time": 1.0},
            id="tp2-pp2-large-chunks",
            marks=pytest.mark.slow,
        ),
    ],
)
async def test_prompt_logprobs_with_chunks_of_one_prompt_in_flight(
    layout: tuple[int, int, int], settings: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With SPP a prompt's next chunk enters stage 0 while the previous one is on stage 1; each
    # chunk's last row scores the next chunk's first token.
    from medha.actors.pipeline_scheduler import PipelineSchedulerActor

    in_flight: list[tuple[int, int]] = []  # (chunk's scored rows, its prompt's chunks in flight)
    issue = PipelineSchedulerActor._issue

    def watching(self: PipelineSchedulerActor, plan: object) -> None:
        for seq in plan.seqs:  # type: ignore[attr-defined]
            request = self.requests[seq.request_id]
            if request.params.prompt_logprobs is not None:
                ahead = sum(
                    1
                    for flight in self._order
                    if flight.plan is not None
                    and any(s.request_id == seq.request_id for s in flight.plan.seqs)
                )
                in_flight.append((len(request.score_rows(seq.start, seq.end)), ahead))
        issue(self, plan)

    monkeypatch.setattr(PipelineSchedulerActor, "_issue", watching)
    prompts = [[(7 * i + 3 * n) % 503 for i in range(n)] for n in (600, 300)]
    params = SamplingParams.greedy(4, ignore_eos=True, prompt_logprobs=4)
    done: list[medha.Completion] = []
    async with medha.Engine(parallel_config(*layout, num_blocks=96, **settings)) as engine:

        async def score(prompt: list[int]) -> None:
            done.append(await engine.generate(prompt, params))

        async with anyio.create_task_group() as group:
            for prompt in prompts:
                group.start_soon(score, prompt)
        assert engine.stats().free_blocks == engine.stats().total_blocks
    assert max(ahead for _, ahead in in_flight) >= 1, in_flight
    if layout[0] > 1:
        assert max(rows for rows, _ in in_flight) > 256, in_flight
    for completion in done:
        assert_prompt_logprobs_equal_hf(completion, 4)
        assert completion.token_ids == hf_greedy(completion.prompt_token_ids, 4)


# Penalties, min_tokens and bad words depend on every token so far, which the sampling worker
# counts from the steps it runs: a recomputed prompt must not count twice. A structured output's
# mask comes with each step from the scheduler, which must not lose its place on a preemption.
PENALTIES = [
    {},
    {"repetition_penalty": 1.4, "bad_words": ["the", " and"]},
    {"presence_penalty": 1.5, "frequency_penalty": 0.5, "min_tokens": 8},
    {"structured_outputs": {"regex": "[a-z]+( [a-z]+)*"}},
]


async def _sample_all(engine: medha.Engine, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """Seeded temperature sampling for every request, concurrently, some with penalties."""
    results: list[list[int]] = [[] for _ in work]

    async def one(i: int) -> None:
        prompt, max_tokens = work[i]
        extra = PENALTIES[i % len(PENALTIES)]
        if "min_tokens" in extra:
            extra = {**extra, "min_tokens": min(8, max_tokens)}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=100 + i, **extra)
        done = await engine.generate(prompt, params, request_id=f"s{i}")
        if "structured_outputs" in extra:
            # Cut short by max_tokens, it may end between two words.
            cut = " ?" if done.finish_reason == "length" else ""
            assert re.fullmatch(extra["structured_outputs"]["regex"] + cut, done.text), done.text
        results[i] = done.token_ids

    async with anyio.create_task_group() as group:
        for i in range(len(work)):
            group.start_soon(one, i)
    return results


@pytest.mark.slow
async def test_seeded_sampling_survives_preemption_across_processes() -> None:
    # A KV cache far too small for the workload (13 blocks per KVP group): requests are evicted
    # and recomputed on the workers, yet each one's seeded random stream continues where it
    # was, so every request samples what one process samples with room to spare.
    # Long outputs: decodes keep asking for blocks while others hold theirs.
    work = [
        (prompt, min(48, 2 * KVP_TOKENS - len(prompt)))
        for prompt, _ in workload(seed=9, count=6, long_prompts=2)
    ]
    async with medha.Engine(parallel_config(1, 2, 2, num_blocks=13)) as engine:
        parallel = await _sample_all(engine, work)
        stats = engine.stats()
    assert stats.preemptions > 0, "the test meant to force preemption"
    assert stats.free_blocks == stats.total_blocks
    single = parallel_config(1, 1, 1, num_blocks=256)
    async with medha.Engine(single) as engine:
        alone = await _sample_all(engine, work)
    assert parallel == alone
    assert any(len(set(tokens)) > 1 for tokens in alone)  # really sampled, not a constant
