"""SamplingParams.structured_outputs through the engine: greedy outputs equal greedy decoding over
HF transformers' logits with the grammar's mask applied by definition, among other requests and
through preemption by recompute; sampled outputs always follow the grammar; a grammar that does
not compile is refused before anything is queued, and harms no other request."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest

import medha
from medha import SamplingParams, StructuredOutputsParams
from tests.engine_support import engine_config, greedy_alone, greedy_under_grammar

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "n", "color"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", 'say "maybe"']
REGEX = r"[0-9]{3}-[a-z]{2,4}"
GRAMMARS = {
    "json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
    "choice": StructuredOutputsParams(choice=CHOICES),
    "regex": StructuredOutputsParams(regex=REGEX),
    "lark": StructuredOutputsParams(grammar='start: "(" item ("," item)* ")"\nitem: /[a-c]/'),
}
MAX_TOKENS = 40


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _check_follows(kind: str, text: str) -> None:
    if kind == "json":
        value = json.loads(text)
        assert set(value) == {"ok", "n", "color"}
        assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
        assert value["color"] in ("red", "green", "blue")
    elif kind == "choice":
        assert text in CHOICES
    elif kind == "regex":
        assert re.fullmatch(REGEX, text)
    else:
        assert re.fullmatch(r"\([a-c](,[a-c])*\)", text)


async def test_greedy_outputs_equal_hf_decoding_under_the_grammar() -> None:
    results: dict[str, medha.Completion] = {}
    async with medha.Engine(engine_config(target_batch_time=0.003)) as engine:
        eos = tuple(engine.tokenizer.eos_token_ids)

        async def run(name: str, prompt: list[int], params: SamplingParams) -> None:
            results[name] = await engine.generate(prompt, params)

        async with anyio.create_task_group() as group:
            for kind, grammar in GRAMMARS.items():
                params = SamplingParams.greedy(MAX_TOKENS, structured_outputs=grammar)
                group.start_soon(run, kind, PROMPT, params)
            group.start_soon(run, "free", [9, 8, 7, 6], SamplingParams.greedy(12, ignore_eos=True))
        stats = engine.stats()
    for kind, grammar in GRAMMARS.items():
        done = results[kind]
        assert done.token_ids == greedy_under_grammar(PROMPT, grammar, MAX_TOKENS, eos), kind
        assert done.finish_reason == "stop", (kind, done.text)
        _check_follows(kind, done.text)
    # A request without one, in the same batches, is untouched.
    assert results["free"].token_ids == greedy_alone((9, 8, 7, 6), 12)
    assert stats.free_blocks == stats.total_blocks


async def test_sampled_outputs_always_follow_the_grammar() -> None:
    async with medha.Engine(engine_config()) as engine:
        outputs: dict[tuple[str, int], str] = {}

        async def run(kind: str, seed: int) -> None:
            params = SamplingParams(
                max_tokens=MAX_TOKENS, seed=seed, structured_outputs=GRAMMARS[kind]
            )
            done = await engine.generate(PROMPT, params)
            assert done.finish_reason == "stop", (kind, seed, done.text)
            outputs[kind, seed] = done.text

        async with anyio.create_task_group() as group:
            for kind in GRAMMARS:
                for seed in range(6):
                    group.start_soon(run, kind, seed)
        again = await engine.generate(
            PROMPT,
            SamplingParams(max_tokens=MAX_TOKENS, seed=3, structured_outputs=GRAMMARS["json"]),
        )
    for (kind, _), text in outputs.items():
        _check_follows(kind, text)
    # Really sampled: the seeds gave different outputs; and a seed gives the same one again.
    assert len({outputs["json", seed] for seed in range(6)}) > 1
    assert again.text == outputs["json", 3]


@pytest.mark.parametrize(
    "structured",
    [
        {"regex": "[0-9"},
        {"grammar": "start: undefined_rule"},
        {"json": {"type": "no-such-type"}},
    ],
    ids=["regex", "lark", "schema"],
)
async def test_a_grammar_that_does_not_compile_is_refused_before_it_is_queued(
    structured: dict[str, Any],
) -> None:
    params = SamplingParams(max_tokens=4, structured_outputs=structured)
    async with medha.Engine(engine_config()) as engine:
        other = engine.stream([9, 8, 7], SamplingParams.greedy(30, ignore_eos=True))
        tokens = [await other.__anext__()]
        with pytest.raises(medha.InvalidSamplingParamsError, match="does not compile"):
            engine.stream(PROMPT, params)
        with pytest.raises(medha.InvalidSamplingParamsError, match="does not compile"):
            await engine.generate(PROMPT, params)
        assert engine.stats().waiting == 0
        tokens += [event async for event in other]
        stats = engine.stats()
    assert [t.token_id for t in tokens] == greedy_alone((9, 8, 7), 30)
    assert stats.finished == 1 and stats.aborted == 0
    assert stats.free_blocks == stats.total_blocks


async def test_structured_outputs_survive_preemption_by_recompute() -> None:
    # Eight grammar requests of up to 60 tokens in 12 blocks (192 tokens): they are evicted
    # and recomputed; each one's matcher waits meanwhile (its output tokens are kept).
    long_regex = StructuredOutputsParams(regex="[a-z]+( [a-z]+){8,}")
    work = [(PROMPT[i:] + [i + 9] * 12, [GRAMMARS["json"], long_regex][i % 2]) for i in range(8)]

    async def run_all(engine: medha.Engine) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in work]

        async def one(i: int) -> None:
            prompt, grammar = work[i]
            params = SamplingParams.greedy(60, structured_outputs=grammar)
            results[i] = (await engine.generate(prompt, params)).token_ids

        async with anyio.create_task_group() as group:
            for i in range(len(work)):
                group.start_soon(one, i)
        return results

    async with medha.Engine(engine_config(num_blocks=1024)) as engine:
        roomy = await run_all(engine)
    async with medha.Engine(engine_config(num_blocks=12, target_batch_time=0.003)) as engine:
        tight = await run_all(engine)
        stats = engine.stats()
    assert stats.preemptions > 0, "the small cache never forced a preemption"
    assert tight == roomy
    assert stats.free_blocks == stats.total_blocks
    assert min(len(tokens) for tokens in roomy[1::2]) > 16  # the regex ones ran long


async def test_a_token_outside_the_grammar_ends_that_request_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A mask that allows everything stands for a sampler bug: the scheduler actor refuses the
    # token it lets through, the request fails with the reason, and the rest go on.
    import numpy as np

    from medha.grammar import GrammarMatcher

    monkeypatch.setattr(
        GrammarMatcher, "next_mask", lambda self: np.full(self._words, -1, dtype=np.int32)
    )
    digits = SamplingParams.greedy(8, structured_outputs={"regex": "[0-9]{8}"})
    async with medha.Engine(engine_config()) as engine:
        free = engine.stream([9, 8, 7], SamplingParams.greedy(20, ignore_eos=True))
        tokens = [await free.__anext__()]
        with pytest.raises(medha.GrammarViolationError, match="breaks the request's structured"):
            await engine.generate(PROMPT, digits)
        tokens += [event async for event in free]
        stats = engine.stats()
    assert [t.token_id for t in tokens] == greedy_alone((9, 8, 7), 20)
    assert stats.free_blocks == stats.total_blocks


async def test_an_objects_properties_come_in_the_schemas_order() -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    grammar = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    async with medha.Engine(engine_config()) as engine:
        done = await engine.generate(PROMPT, SamplingParams.greedy(30, structured_outputs=grammar))
    assert re.fullmatch(r'\{"zeta":(true|false),"alpha":(true|false)\}', done.text), done.text


async def test_ignore_eos_keeps_the_output_going_within_the_grammar() -> None:
    digits = StructuredOutputsParams(regex="[0-9]+")
    async with medha.Engine(engine_config()) as engine:
        # A bias makes eos the model's choice wherever the grammar allows it.
        bias = {eos: 20.0 for eos in engine.tokenizer.eos_token_ids}
        params = SamplingParams.greedy(12, logit_bias=bias, structured_outputs=digits)
        ends = await engine.generate(PROMPT, params)
        goes_on = await engine.generate(
            PROMPT,
            SamplingParams.greedy(12, logit_bias=bias, ignore_eos=True, structured_outputs=digits),
        )
    assert ends.finish_reason == "stop" and len(ends.token_ids) == 2  # a digit, then eos
    assert goes_on.finish_reason == "length" and len(goes_on.token_ids) == 12
    assert re.fullmatch("[0-9]+", goes_on.text) and goes_on.text.startswith(ends.text)


async def test_a_stop_string_cuts_a_structured_output_short() -> None:
    params = SamplingParams.greedy(MAX_TOKENS, stop=[":"], structured_outputs=GRAMMARS["json"])
    async with medha.Engine(engine_config()) as engine:
        done = await engine.generate(PROMPT, params)
    assert (done.text, done.finish_reason) == ('{"ok"', "stop")


async def test_the_grammar_wins_over_min_tokens_and_disjoint_allowed_tokens() -> None:
    yes_no = StructuredOutputsParams(choice=["yes", "no"])
    async with medha.Engine(engine_config()) as engine:
        vocab = engine._vocab_size
        grammar_tokens = {
            t
            for word in ("yes", "no")
            for t in engine.tokenizer.encode(word, add_special_tokens=False)
        }
        outside = [t for t in range(vocab) if t not in grammar_tokens][:5]
        # min_tokens cannot keep a complete output going; allowed tokens the grammar never
        # allows give way to it (the output stays valid).
        long_min = SamplingParams.greedy(10, min_tokens=8, structured_outputs=yes_no)
        disjoint = SamplingParams.greedy(10, allowed_token_ids=outside, structured_outputs=yes_no)
        results = [await engine.generate(PROMPT, params) for params in (long_min, disjoint)]
    for done in results:
        assert done.text in ("yes", "no") and done.finish_reason == "stop"
        assert len(done.token_ids) < 8
