"""generate_single, the one-request path of `medha generate` and the benchmarks' "alone" runs:
its output limit and token ids are checked as the engine checks them."""

from __future__ import annotations

import pytest

from medha.errors import InvalidSamplingParamsError, PromptTooLongError
from medha.model.setup import build_runner
from medha.model.single import generate_single
from medha.sampling import SamplingParams
from medha.structured_outputs import StructuredOutputsParams
from tests.engine_support import grammar_compiler, greedy_under_grammar


def test_max_tokens_none_stops_at_the_models_context_not_the_larger_cache() -> None:
    runner, tokenizer = build_runner("tiny-random", num_blocks=300)  # 4,800 tokens
    context = runner.arch.context_len
    assert runner.kv_cache.capacity_tokens > context
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    with pytest.raises(PromptTooLongError, match="leave no room"):
        next(generate_single(runner, [5] * context, params, tokenizer))
    tokens = list(generate_single(runner, [5] * (context - 3), params, tokenizer))
    assert len(tokens) == 3 and tokens[-1].finish_reason == "length"


def test_ids_beyond_the_vocabulary_are_refused_by_name() -> None:
    runner, tokenizer = build_runner("tiny-random", num_blocks=16)
    params = SamplingParams(max_tokens=2, allowed_token_ids=[3, 10**6])
    with pytest.raises(InvalidSamplingParamsError, match="allowed_token_ids"):
        next(generate_single(runner, [5, 6], params, tokenizer))


def test_a_truncated_prompt_runs_as_its_last_tokens() -> None:
    runner, tokenizer = build_runner("tiny-random", num_blocks=64)
    prompt = [(7 * i) % 200 + 3 for i in range(300)]
    params = SamplingParams.greedy(5, ignore_eos=True)
    truncated = SamplingParams.greedy(5, ignore_eos=True, truncate_prompt_tokens=40)
    expected = [t.token_id for t in generate_single(runner, prompt[-40:], params, tokenizer)]
    got = [t.token_id for t in generate_single(runner, prompt, truncated, tokenizer)]
    assert got == expected


def test_bad_words_are_refused_without_a_tokenizer_to_encode_them() -> None:
    runner, tokenizer = build_runner("tiny-random", num_blocks=16)
    params = SamplingParams(max_tokens=2, bad_words=["hello"])
    with pytest.raises(InvalidSamplingParamsError, match="bad_words"):
        next(generate_single(runner, [5, 6], params, tokenizer))


def test_structured_outputs_need_their_compiled_grammar_and_then_match_the_engines() -> None:
    runner, tokenizer = build_runner("tiny-random", num_blocks=16)
    grammar = StructuredOutputsParams(regex="[a-z]+( [a-z]+)*")
    params = SamplingParams.greedy(30, structured_outputs=grammar)
    with pytest.raises(InvalidSamplingParamsError, match="structured_outputs compiled"):
        next(generate_single(runner, [5, 6], params, tokenizer))
    with pytest.raises(InvalidSamplingParamsError, match="structured_outputs compiled"):
        matcher = grammar_compiler().matcher(grammar)
        next(generate_single(runner, [5, 6], SamplingParams.greedy(3), tokenizer, grammar=matcher))
    eos = grammar_compiler()._tokenizer.eos_token_ids
    tokens = generate_single(
        runner, [5, 6], params, tokenizer, eos, grammar=grammar_compiler().matcher(grammar)
    )
    assert [t.token_id for t in tokens] == greedy_under_grammar([5, 6], grammar, 30)
