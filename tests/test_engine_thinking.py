"""A structured output after the model's thinking (StructuredOutputsParams.thinking), through the
engine: the thinking is free, the constraint holds from its end tag on.

The random model is kept to a few tokens while it thinks (allowed_token_ids, the end tag among
them), so that it ends its thinking soon; the constraint's tokens are not among them, and the
grammar wins where the two share none, so what follows the thinking is the grammar's alone.
"""

from __future__ import annotations

import re

import pytest

import medha
from medha import SamplingParams, StructuredOutputsParams, Thinking
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]
CHOICES = ["yes", "no"]
TAGS = ("[", "]")
"""One token each in the test model's vocabulary (ordinary ones, so read as text: added tokens
such as Qwen 3's `<think>` are tests/test_thinking_grammar.py's)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("opened", [True, False])
async def test_the_constraint_holds_from_the_end_of_the_thinking(opened: bool) -> None:
    outputs = []
    async with medha.Engine(engine_config()) as engine:
        thinking_tokens = [
            engine.tokenizer.encode(text, add_special_tokens=False)[0] for text in ("a", "b", *TAGS)
        ]
        for seed in range(6):
            structured = StructuredOutputsParams(
                choice=CHOICES, thinking=Thinking(*TAGS, opened=opened)
            )
            params = SamplingParams(
                max_tokens=80,
                seed=seed,
                allowed_token_ids=thinking_tokens,
                structured_outputs=structured,
            )
            done = await engine.generate(PROMPT, params)
            assert done.finish_reason == "stop", done.text
            outputs.append(done.text)
        stats = engine.stats()
    # Not opened, the output has to start the thinking with its start tag (the only allowed
    # token the grammar allows first).
    head = "" if opened else r"\["
    for text in outputs:
        assert re.fullmatch(head + r"[ab\[]*\](yes|no)", text), text
    assert len(set(outputs)) > 1  # really sampled
    assert max(len(text.partition("]")[0]) for text in outputs) > len(head)  # and thought
    assert stats.free_blocks == stats.total_blocks
