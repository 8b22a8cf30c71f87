"""A step paused between layers, with other steps run meanwhile, gives bitwise the logits and
the KV cache of the same step run through; `advance` asks whether to pause after every layer
but the last."""

from __future__ import annotations

import random

import pytest
import torch

from medha.model.runner import StepSeq
from tests.runner_support import ShuffledBlocks, blocks_for, make_runner

pytestmark = pytest.mark.parametrize("backend", ["reference", "sdpa"])


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300) for _ in range(length)]


def _two_steps(
    blocks: ShuffledBlocks, prompts: list[list[int]], chunk: int
) -> tuple[list[StepSeq], list[StepSeq], list[int]]:
    """Two steps over the prompts (their first `chunk` tokens, then the rest) and the blocks
    they use."""
    tables = [blocks.take(blocks_for(len(p))) for p in prompts]
    first = [StepSeq(p[:chunk], 0, t, sample=False) for p, t in zip(prompts, tables, strict=True)]
    rest = [StepSeq(p[chunk:], chunk, t) for p, t in zip(prompts, tables, strict=True)]
    return first, rest, [block for table in tables for block in table]


def test_a_paused_step_gives_bitwise_the_uninterrupted_result(backend: str) -> None:
    through = make_runner("llama3-gqa", backend)
    paused = make_runner("llama3-gqa", backend)
    paused.model.load_state_dict(through.model.state_dict())
    long_prompts = [_prompt(1, 90), _prompt(2, 40)]
    other = _prompt(3, 30)

    results = []
    for runner, pause in ((through, False), (paused, True)):
        blocks = ShuffledBlocks(runner.kv_cache.num_blocks, seed=5)
        first, rest, used = _two_steps(blocks, long_prompts, 32)
        runner.step(first)
        step = runner.start_step(rest)
        if pause:
            assert not step.advance(lambda: True)
            assert step.next_layer == 1
            # Another request's whole prefill runs while the step waits.
            runner.step([StepSeq(other, 0, blocks.take(blocks_for(len(other))))])
        results.append((step.run(), runner.kv_cache, used))

    (logits_a, cache_a, used_a), (logits_b, cache_b, used_b) = results
    assert used_a == used_b
    assert torch.equal(logits_a, logits_b)
    for layer in range(len(cache_a.k)):
        assert torch.equal(cache_a.k[layer][used_a], cache_b.k[layer][used_a])
        assert torch.equal(cache_a.v[layer][used_a], cache_b.v[layer][used_a])


def test_advance_asks_after_every_layer_but_the_last(backend: str) -> None:
    runner = make_runner("llama3-gqa", backend)
    table = ShuffledBlocks(64).take(2)
    layers = len(runner.model.model.layers)
    assert layers >= 2

    asked: list[int] = []
    step = runner.start_step([StepSeq(_prompt(4, 20), 0, table)])
    assert step.advance(lambda: asked.append(step.next_layer) is None and False)
    assert asked == list(range(1, layers))

    step = runner.start_step([StepSeq(_prompt(4, 20), 0, table)])
    stops = 0
    while not step.advance(lambda: True):
        stops += 1
        with pytest.raises(RuntimeError, match="stopped after layer"):
            step.logits()
    assert stops == layers - 1 and step.done
    one_layer_at_a_time = step.logits()
    assert torch.equal(one_layer_at_a_time, runner.step([StepSeq(_prompt(4, 20), 0, table)]))


def test_a_split_step_goes_on_with_each_part_as_in_the_whole(backend: str) -> None:
    runner = make_runner("llama3-gqa", backend)
    blocks = ShuffledBlocks(runner.kv_cache.num_blocks, seed=9)
    decoded = _prompt(6, 40)
    decode_table = blocks.take(blocks_for(len(decoded) + 1))
    runner.step([StepSeq(decoded, 0, decode_table)])
    prompt, other = _prompt(7, 30), _prompt(8, 20)
    prompt_table = blocks.take(blocks_for(len(prompt)))
    other_table = blocks.take(blocks_for(len(other)))
    batch = [
        StepSeq(prompt, 0, prompt_table, sample=False),
        StepSeq([7], len(decoded), decode_table),
        StepSeq(other, 0, other_table),
    ]
    # The same steps on a twin runner, the second one whole.
    twin = make_runner("llama3-gqa", backend)
    twin.model.load_state_dict(runner.model.state_dict())
    twin.step([StepSeq(decoded, 0, decode_table)])
    whole = twin.step(batch, all_logits=True)

    step = runner.start_step(batch, all_logits=True)
    assert not step.advance(lambda: True)
    with pytest.raises(ValueError, match="both sides"):
        runner.split_step(step, [0, 1, 2])
    decode_part, rest = runner.split_step(step, [1])
    assert [len(s.token_ids) for s in rest.seqs] == [30, 20]
    decode_logits = decode_part.run()
    rest_logits = rest.run()
    torch.testing.assert_close(decode_logits, whole[30:31], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rest_logits, torch.cat([whole[:30], whole[31:]]), rtol=1e-5, atol=1e-5
    )
