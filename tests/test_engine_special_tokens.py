"""skip_special_tokens through the engine: the same tokens either way; without it, special
tokens (a chat template's markers, eos) have their text in the output, and stop strings may
match it."""

from __future__ import annotations

import pytest

import medha
from medha import SamplingParams
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

IM_START, IM_END, WORD = 2, 3, 88
"""tiny-random's `<|im_start|>` (special), `<|im_end|>` (special, an eos) and an ordinary token."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _mixed(**fields: object) -> SamplingParams:
    """Samples of <|im_start|> and an ordinary token, the same for any skip_special_tokens."""
    return SamplingParams(
        max_tokens=12, seed=5, allowed_token_ids=[IM_START, WORD], ignore_eos=True, **fields
    )


async def test_without_skip_special_tokens_the_output_text_has_the_special_tokens() -> None:
    async with medha.Engine(engine_config()) as engine:
        skipped = await engine.generate([5, 6, 7], _mixed())
        shown = await engine.generate([5, 6, 7], _mixed(skip_special_tokens=False))
        pieces = [
            event.text
            async for event in engine.stream([5, 6, 7], _mixed(skip_special_tokens=False))
        ]
        tokenizer = engine.tokenizer
    assert shown.token_ids == skipped.token_ids
    assert IM_START in shown.token_ids and WORD in shown.token_ids
    assert skipped.text == tokenizer.decode(skipped.token_ids, skip_special_tokens=True)
    assert "<|im_start|>" not in skipped.text
    assert shown.text == tokenizer.decode(shown.token_ids, skip_special_tokens=False)
    assert shown.text.count("<|im_start|>") == shown.token_ids.count(IM_START)
    assert "".join(pieces) == shown.text


async def test_a_stop_string_matches_a_special_tokens_text_only_when_it_is_shown() -> None:
    stop = ["<|im_start|>"]
    async with medha.Engine(engine_config()) as engine:
        shown = await engine.generate([5, 6, 7], _mixed(skip_special_tokens=False, stop=stop))
        skipped = await engine.generate([5, 6, 7], _mixed(stop=stop))
    assert shown.finish_reason == "stop"
    assert shown.token_ids[-1] == IM_START and "<|im_start|>" not in shown.text
    assert skipped.finish_reason == "length" and len(skipped.token_ids) == 12


@pytest.mark.parametrize(
    ("skip", "include", "text"),
    [(False, True, "<|im_end|>"), (False, False, ""), (True, True, "")],
)
async def test_an_eos_has_text_with_include_stop_str_in_output_and_without_skipping(
    skip: bool, include: bool, text: str
) -> None:
    params = SamplingParams(
        max_tokens=4,
        allowed_token_ids=[IM_END],
        skip_special_tokens=skip,
        include_stop_str_in_output=include,
    )
    async with medha.Engine(engine_config()) as engine:
        assert IM_END in engine.tokenizer.eos_token_ids
        done = await engine.generate([5, 6, 7], params)
    assert done.token_ids == [IM_END] and done.finish_reason == "stop"
    assert done.text == text
