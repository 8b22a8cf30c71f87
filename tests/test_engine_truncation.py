"""SamplingParams.truncate_prompt_tokens: a request runs only the last k tokens of its prompt
(vLLM's left truncation), as if they had been its whole prompt."""

from __future__ import annotations

import random

import pytest

import medha
from medha import SamplingParams
from medha.errors import InvalidSamplingParamsError, PromptTooLongError
from medha.request_input import prompt_token_ids
from tests.engine_support import engine_config
from tests.parallel_support import assert_prompt_logprobs_equal_hf, hf_greedy, parallel_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(503) for _ in range(length)]


async def test_a_truncated_prompt_runs_as_its_last_tokens_alone() -> None:
    prompt = _prompt(1, 300)
    params = SamplingParams.greedy(
        6, ignore_eos=True, truncate_prompt_tokens=100, prompt_logprobs=1
    )
    async with medha.Engine(parallel_config(1, 1, 1)) as engine:
        done = await engine.generate(prompt, params)
        streamed = [ev.token_id async for ev in engine.stream(prompt, params)]
    assert done.prompt_token_ids == prompt[-100:]
    assert done.token_ids == streamed == hf_greedy(prompt[-100:], 6)
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == 100
    assert_prompt_logprobs_equal_hf(done, 1)


async def test_a_prompt_beyond_the_context_fits_once_truncated() -> None:
    prompt = _prompt(2, 700)
    async with medha.Engine(parallel_config(1, 1, 1, max_model_len=512)) as engine:
        with pytest.raises(PromptTooLongError):
            await engine.generate(prompt, SamplingParams.greedy(4))
        done = await engine.generate(
            prompt, SamplingParams.greedy(4, ignore_eos=True, truncate_prompt_tokens=500)
        )
        # vLLM's -1 keeps as many as the context holds: then there is no room for output.
        to_context = SamplingParams.greedy(4, truncate_prompt_tokens=-1)
        assert engine.tokenize(prompt, to_context) == prompt[-512:]
        with pytest.raises(PromptTooLongError, match="512 tokens and max_tokens is 4"):
            await engine.generate(prompt, to_context)
    assert done.prompt_token_ids == prompt[-500:]
    assert done.token_ids == hf_greedy(prompt[-500:], 4)


async def test_a_truncated_text_keeps_the_bos_its_tokenizer_adds() -> None:
    # As a tokenizer truncating from the left: the special tokens in front stay, within k.
    text = "the quick brown fox jumps over the lazy dog. " * 8
    async with medha.Engine(engine_config()) as engine:
        tokenizer = engine.tokenizer
        full = tokenizer.encode(text)
        own = tokenizer.encode(text, add_special_tokens=False)
        done = await engine.generate(text, SamplingParams.greedy(2, truncate_prompt_tokens=10))
        with pytest.raises(InvalidSamplingParamsError, match="special token"):
            await engine.generate(text, SamplingParams.greedy(2, truncate_prompt_tokens=1))
        assert engine.stats().waiting == engine.stats().running == 0
    assert full == [tokenizer.bos_token_id, *own] and len(own) > 10
    assert done.prompt_token_ids == [tokenizer.bos_token_id, *own[-9:]]


class _AppendsEos:
    """A tokenizer that puts its special token after the text (not in front)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text] + ([1] if add_special_tokens else [])


def test_a_text_whose_tokenizer_adds_no_prefix_is_cut_like_token_ids() -> None:
    assert prompt_token_ids("abcdef", _AppendsEos(), 200, keep=3) == [ord("e"), ord("f"), 1]
    assert prompt_token_ids([5, 6, 7, 8], _AppendsEos(), 200, keep=2) == [7, 8]
    assert prompt_token_ids([5, 6], _AppendsEos(), 200, keep=5) == [5, 6]
