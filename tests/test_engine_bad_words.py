"""SamplingParams.bad_words through the engine: greedy outputs equal greedy decoding over HF
transformers' logits with the same words banned by definition (vLLM's rule: a word's last token
is banned right after the output spells the rest of it), alone and among other requests."""

from __future__ import annotations

from functools import cache
from typing import Any

import anyio
import pytest
import torch

import medha
from medha import SamplingParams
from medha.sampling import bad_words_token_ids
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]
TOKENS = 12


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@cache
def _hf() -> Any:
    from transformers import AutoModelForCausalLM

    from medha.model.presets import materialize_preset

    model = AutoModelForCausalLM.from_pretrained(
        materialize_preset("tiny-random"), torch_dtype=torch.float32
    )
    return model.eval()


def _reference(prompt: list[int], words: tuple[tuple[int, ...], ...]) -> list[int]:
    ids, out = list(prompt), []
    while len(out) < TOKENS:
        with torch.no_grad():
            logits = _hf()(torch.tensor([ids])).logits[0, -1].clone()
        for word in words:
            before = len(word) - 1
            if len(out) >= before and out[len(out) - before :] == list(word[:-1]):
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


async def test_bad_words_are_never_generated_and_match_the_reference() -> None:
    plain = SamplingParams.greedy(TOKENS, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        free = (await engine.generate(PROMPT, plain)).token_ids
        tokenizer = engine.tokenizer

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        # Words the free output would say: one of its tokens, and a span of two.
        one = tokenizer.decode(free[1:2])
        two = tokenizer.decode(free[4:6])
        words = bad_words_token_ids([one, two], encode, engine._vocab_size)
        banned = SamplingParams.greedy(TOKENS, ignore_eos=True, bad_words=[one, two])
        chat = SamplingParams.greedy(TOKENS, ignore_eos=True)
        results: dict[str, list[int]] = {}

        async def run(name: str, prompt: list[int], params: SamplingParams) -> None:
            results[name] = (await engine.generate(prompt, params)).token_ids

        async with anyio.create_task_group() as group:
            group.start_soon(run, "banned", PROMPT, banned)
            group.start_soon(run, "other", [9, 8, 7, 6], chat)
    assert results["banned"] == _reference(PROMPT, words)
    assert results["banned"] != free
    assert results["other"] == _reference([9, 8, 7, 6], ())
    assert free == _reference(PROMPT, ())
    for word in words:
        spans = [tuple(results["banned"][i : i + len(word)]) for i in range(TOKENS)]
        assert word not in spans
