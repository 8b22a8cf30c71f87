"""Engine.output_limit: how many tokens a request of a prompt of N tokens may generate, or the
error `stream` would raise for it, without sending anything (how /v1/responses finds how much
of a long conversation fits)."""

from __future__ import annotations

import pytest

import medha
from medha import InvalidRequestError, PromptTooLongError, RequestTooLargeError, SamplingParams
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

CONTEXT = 600


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_output_limit_is_what_stream_allows_and_raises_what_stream_raises() -> None:
    small_cache = {"num_blocks": 20, "max_model_len": CONTEXT}  # 320 tokens of KV
    async with (
        medha.Engine(engine_config(num_blocks=64, max_model_len=CONTEXT)) as engine,
        medha.Engine(engine_config(**small_cache)) as cramped,
    ):
        assert engine.output_limit(10, SamplingParams(max_tokens=7)) == 7
        assert engine.output_limit(100, SamplingParams(max_tokens=None)) == CONTEXT - 100
        assert engine.output_limit(100) == 16  # SamplingParams' default max_tokens
        assert cramped.output_limit(100, SamplingParams(max_tokens=None)) == 320 - 100
        # A prompt cut to its last 100 tokens is checked as those, as stream() runs it.
        keep_end = SamplingParams(max_tokens=4, truncate_prompt_tokens=100)
        assert engine.output_limit(5000, keep_end) == 4
        refused = [
            (engine, CONTEXT - 3, SamplingParams(max_tokens=4), PromptTooLongError),
            (engine, CONTEXT, SamplingParams(max_tokens=None), PromptTooLongError),
            (cramped, 300, SamplingParams(max_tokens=30), RequestTooLargeError),
            (cramped, 320, SamplingParams(max_tokens=None), RequestTooLargeError),
        ]
        for which, prompt_tokens, params, error in refused:
            with pytest.raises(error):
                which.output_limit(prompt_tokens, params)
            with pytest.raises(error):
                which.stream([1] * prompt_tokens, params)
        for bad in (0, -5, "12", 3.0, True):
            with pytest.raises(InvalidRequestError, match="prompt_tokens"):
                engine.output_limit(bad)  # type: ignore[arg-type]
        stats = engine.stats()
    assert stats.waiting == stats.running == 0 and stats.free_blocks == stats.total_blocks
