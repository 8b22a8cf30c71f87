"""medha's decoder computes what HF transformers computes, however the prompt is chunked and
whatever else shares the batch."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medha.model.runner import StepSeq
from tests.hf_models import VARIANTS, VOCAB, hf_greedy, hf_logits, max_relative_error
from tests.runner_support import (
    ShuffledBlocks,
    blocks_for,
    greedy_continue,
    make_runner,
    prefill_in_chunks,
)

TOLERANCE = 1e-4


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_prompt_logits_match_hf(variant: str, backend: str) -> None:
    ids = _prompt(0, 150)
    runner = make_runner(variant, backend)
    table = ShuffledBlocks(256).take(blocks_for(len(ids)))
    logits = prefill_in_chunks(runner, ids, [len(ids)], table)
    assert max_relative_error(logits, hf_logits(variant, ids)) <= TOLERANCE


@st.composite
def prompt_and_chunks(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    length = draw(st.integers(1, 96))
    ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length))
    chunks: list[int] = []
    while sum(chunks) < length:
        chunks.append(draw(st.integers(1, length - sum(chunks))))
    return ids, chunks


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=prompt_and_chunks(), block_seed=st.integers(0, 1000))
def test_any_chunk_schedule_gives_hf_logits_and_greedy_continuation(
    variant: str, case: tuple[list[int], list[int]], block_seed: int
) -> None:
    ids, chunks = case
    new_tokens = 16
    runner = make_runner(variant)
    table = ShuffledBlocks(256, block_seed).take(blocks_for(len(ids) + new_tokens))
    logits = prefill_in_chunks(runner, ids, chunks, table)
    assert max_relative_error(logits, hf_logits(variant, ids)) <= TOLERANCE
    continuation = greedy_continue(runner, int(logits[-1].argmax()), len(ids), table, new_tokens)
    assert continuation == hf_greedy(variant, ids, new_tokens)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batch_of_chunks_and_decodes_equals_per_request_forwards(
    variant: str, backend: str
) -> None:
    """Prefill chunks at different offsets and decodes, in one forward, give the logits each
    sequence gets alone."""
    # (cached prefix length, query tokens this step): three prefill chunks, three decodes.
    shapes = [(0, 33), (17, 20), (64, 5), (40, 1), (1, 1), (95, 1)]
    blocks = ShuffledBlocks(512, seed=7)
    prompts = [_prompt(10 + i, cached + q) for i, (cached, q) in enumerate(shapes)]
    tables = [blocks.take(blocks_for(len(p))) for p in prompts]

    def run(runner_batches: list[list[int]]) -> list[torch.Tensor]:
        runner = make_runner(variant, backend, num_blocks=512)
        for i, (cached, _) in enumerate(shapes):
            if cached:
                runner.step([StepSeq(prompts[i][:cached], 0, tables[i], sample=False)])
        results: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
        for group in runner_batches:
            steps = [StepSeq(prompts[i][shapes[i][0] :], shapes[i][0], tables[i]) for i in group]
            logits = runner.step(steps, all_logits=True)
            offset = 0
            for i in group:
                q = shapes[i][1]
                results[i] = logits[offset : offset + q]
                offset += q
        return results

    together = run([list(range(len(shapes)))])
    alone = run([[i] for i in range(len(shapes))])
    for mixed, single in zip(together, alone, strict=True):
        assert max_relative_error(mixed, single) <= TOLERANCE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_rows_are_the_last_token_of_each_sampling_sequence(variant: str) -> None:
    runner = make_runner(variant)
    blocks = ShuffledBlocks(256)
    a, b = _prompt(1, 30), _prompt(2, 12)
    ta, tb = blocks.take(blocks_for(30)), blocks.take(blocks_for(12))
    logits = runner.step([StepSeq(a, 0, ta), StepSeq(b, 0, tb, sample=False)])
    assert logits.shape == (1, VOCAB)
    assert max_relative_error(logits[0], hf_logits(variant, a)[-1]) <= TOLERANCE


def test_token_outside_vocabulary_is_rejected_before_running() -> None:
    runner = make_runner("llama3-gqa")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.step([StepSeq([1, VOCAB], 0, [0])])
