"""SamplingParams.truncate_prompt_tokens: a request runs only the last k tokens of its prompt
(vLLM's left truncation), as if they had been its whole prompt."""

from __future__ import annotations

import random

import pytest

import medha
from medha import SamplingParams
from medha.errors import PromptTooLongError
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
    assert done.prompt_token_ids == prompt[-500:]
    assert done.token_ids == hf_greedy(prompt[-500:], 4)
