"""SamplingParams.bad_words through the engine: greedy outputs equal greedy decoding over HF
transformers' logits with the same words banned by definition (vLLM's rule: a word's last token
is banned right after the output spells the rest of it), alone and among other requests."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest
import torch

import medha
from medha import SamplingParams
from medha.sampling import bad_words_token_ids
from tests.engine_support import engine_config, hf_model

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]
TOKENS = 12


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _reference(prompt: list[int], words: tuple[tuple[int, ...], ...]) -> list[int]:
    ids, out = list(prompt), []
    while len(out) < TOKENS:
        with torch.no_grad():
            logits = hf_model()(torch.tensor([ids])).logits[0, -1].clone()
        for word in words:
            before = len(word) - 1
            if len(out) >= before and out[len(out) - before :] == list(word[:-1]):
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def _two_token_word(free: list[int], tokenizer: Any, vocab: int) -> tuple[int, str]:
    """(k, text) of a word whose banned forms include free[k:k + 2]."""
    encode = partial(tokenizer.encode, add_special_tokens=False)
    for k in range(1, TOKENS - 2):
        text = tokenizer.decode(free[k : k + 2])
        if text.strip() and tuple(free[k : k + 2]) in bad_words_token_ids([text], encode, vocab):
            return k, text
    raise AssertionError(f"no two free tokens spell a word: {free}")


async def test_bad_words_are_never_generated_and_match_the_reference() -> None:
    plain = SamplingParams.greedy(TOKENS, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        free = (await engine.generate(PROMPT, plain)).token_ids
        tokenizer, vocab = engine.tokenizer, engine._vocab_size
        encode = partial(tokenizer.encode, add_special_tokens=False)
        # A two-token word the free output says at k, k + 1, and a one-token one it says at 1.
        k, two = _two_token_word(free, tokenizer, vocab)
        one = tokenizer.decode(free[1:2])
        two_forms = bad_words_token_ids([two], encode, vocab)
        one_forms = bad_words_token_ids([one], encode, vocab)
        assert (free[1],) in one_forms
        results: dict[str, list[int]] = {}

        async def run(name: str, prompt: list[int], words: list[str]) -> None:
            params = SamplingParams.greedy(TOKENS, ignore_eos=True, bad_words=words or None)
            results[name] = (await engine.generate(prompt, params)).token_ids

        async with anyio.create_task_group() as group:
            group.start_soon(run, "two", PROMPT, [two])
            group.start_soon(run, "one", PROMPT, [one])
            group.start_soon(run, "other", [9, 8, 7, 6], [])
    assert free == _reference(PROMPT, ())
    # The two-token ban fires exactly where the free output would have said the word.
    assert results["two"] == _reference(PROMPT, two_forms)
    assert results["two"][: k + 1] == free[: k + 1] and results["two"][k + 1] != free[k + 1]
    assert results["one"] == _reference(PROMPT, one_forms)
    assert results["one"][:1] == free[:1] and results["one"][1] != free[1]
    assert results["other"] == _reference([9, 8, 7, 6], ())
    for name, forms in (("two", two_forms), ("one", one_forms)):
        for form in forms:
            spans = [tuple(results[name][i : i + len(form)]) for i in range(TOKENS)]
            assert form not in spans
