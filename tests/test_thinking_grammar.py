"""A structured output that a reasoning model may think before (StructuredOutputsParams.thinking):
free text between the tags first, then the constraint, whatever its kind; an output that starts
inside the thinking or may skip it; tags read as text or as the vocabulary's one token each."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from medha import (
    GrammarViolationError,
    InvalidSamplingParamsError,
    StructuredOutputsParams,
    Thinking,
)
from medha.grammar import GrammarCompiler
from medha.model.tokenizer import EOS_TOKEN, Tokenizer, write_tiny_tokenizer
from tests.engine_support import grammar_compiler

CONSTRAINTS: dict[str, tuple[dict[str, Any], str]] = {
    "json": ({"json": {"type": "object", "properties": {"a": {"type": "integer"}}}}, '{"a": 7}'),
    "regex": ({"regex": "(yes|no)!"}, "no!"),
    "choice": ({"choice": ["north", "south"]}, "south"),
    "grammar": ({"grammar": 'start: "a" B\nB: /b+/ "."'}, "abbb."),
    "gbnf": ({"grammar": 'root ::= "a" [b]+ "."'}, "abbb."),
}


@cache
def _token_tags_compiler(folder: Path) -> GrammarCompiler:
    """A tiny tokenizer that has the tags as tokens of their own, added but not special (as
    Qwen 3's)."""
    from transformers import PreTrainedTokenizerFast

    write_tiny_tokenizer(folder)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=EOS_TOKEN)
    hf.add_tokens(["<think>", "</think>"])
    return GrammarCompiler(Tokenizer(hf, folder=folder), len(hf))


@pytest.fixture(params=["text tags", "token tags"])
def compiler(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if request.param == "text tags":  # the test model's tokenizer has no such tokens
        return grammar_compiler()
    return _token_tags_compiler(tmp_path_factory.getbasetemp() / "token-tags")


def _ids(compiler: GrammarCompiler, text: str) -> list[int]:
    """`text`'s tokens (a tag the vocabulary has is its token: tokenizers split added tokens
    out first)."""
    return compiler._tokenizer.encode(text, add_special_tokens=False)


def _complete_after_each(
    compiler: GrammarCompiler, params: StructuredOutputsParams, ids: list[int]
) -> list[bool]:
    """Feed `ids` through a fresh matcher: whether the output is complete after each.
    GrammarViolationError at the first token the grammar refuses."""
    matcher = compiler.matcher(params)
    return [matcher.advance(token) for token in ids]


def _params(kind: str, **thinking: Any) -> StructuredOutputsParams:
    return StructuredOutputsParams(**CONSTRAINTS[kind][0], thinking=Thinking(**thinking))


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_the_constraint_holds_after_the_thinking(compiler: GrammarCompiler, kind: str) -> None:
    answer = CONSTRAINTS[kind][1]
    for opened in (False, True):
        params = _params(kind, opened=opened)
        # "< 2" and "</thin": the thinking is any text without the end tag.
        thought = f"<think>Is 1 < 2? </thin, yes.\n</think>{answer}"
        done = _complete_after_each(compiler, params, _ids(compiler, thought))
        assert done[-1] and not any(done[:-1]), opened
        # Empty thinking, and (once the tag is written) nothing else than the constraint.
        empty = _ids(compiler, f"<think></think>{answer}")
        assert _complete_after_each(compiler, params, empty)[-1]
        with pytest.raises(GrammarViolationError):
            _complete_after_each(compiler, params, _ids(compiler, f"<think>x</think>?{answer}"))
        with pytest.raises(GrammarViolationError):  # the thinking ends at its first end tag
            _complete_after_each(compiler, params, _ids(compiler, "<think>x</think>y</think>"))


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_where_the_output_starts(compiler: GrammarCompiler, kind: str) -> None:
    answer = CONSTRAINTS[kind][1]
    # Not opened: the thinking may be skipped, and it starts with the start tag or not at all.
    assert _complete_after_each(compiler, _params(kind), _ids(compiler, answer))[-1]
    with pytest.raises(GrammarViolationError):
        _complete_after_each(compiler, _params(kind), _ids(compiler, f"hm</think>{answer}"))
    # Opened: the output is thinking from its first token (the start tag is allowed again),
    # so an answer at once is read as thinking.
    opened = _params(kind, opened=True)
    assert _complete_after_each(compiler, opened, _ids(compiler, f"hm</think>{answer}"))[-1]
    assert not any(_complete_after_each(compiler, opened, _ids(compiler, answer)))


def test_a_tag_the_vocabulary_has_is_its_token(tmp_path: Path) -> None:
    compiler = _token_tags_compiler(tmp_path)
    end = compiler._tag_token("</think>")
    assert end is not None and _ids(compiler, "</think>") == [end]
    spelled = _ids(compiler, "</think") + _ids(compiler, ">")
    assert end not in spelled
    params = _params("regex", opened=True)
    with pytest.raises(GrammarViolationError):  # spelled out, the tag would be thinking
        _complete_after_each(compiler, params, _ids(compiler, "hm") + spelled)
    matcher = compiler.matcher(params)
    for token in _ids(compiler, "hm"):
        matcher.accept(token)
    allowed = _allowed(matcher.next_mask())
    assert end in allowed and set(_ids(compiler, "any text")) <= allowed
    # Where the tags are text, they are read as text.
    assert grammar_compiler()._tag_token("</think>") is None


def test_thinking_false_is_the_constraint_from_the_first_token() -> None:
    compiler = grammar_compiler()  # a regex reads the tags as text
    params = StructuredOutputsParams(regex="<think>x</think>y", thinking=False)
    assert params.thinking is False
    done = _complete_after_each(compiler, params, _ids(compiler, "<think>x</think>y"))
    assert done[-1] and not any(done[:-1])


def test_thinking_tags_of_a_models_own(compiler: GrammarCompiler) -> None:
    params = StructuredOutputsParams(
        choice=["A", "B"], thinking={"start": "[THINK]", "end": "[/THINK]", "opened": True}
    )
    assert params.thinking == Thinking("[THINK]", "[/THINK]", opened=True)
    done = _complete_after_each(compiler, params, _ids(compiler, "1+1 [think]? [/THINK]B"))
    assert done[-1] and not any(done[:-1])


@pytest.mark.parametrize(("start", "end"), [('<"q">', "<\\q>"), ("\x7f<", ">\x7f")])
def test_tags_with_characters_a_lark_literal_escapes(start: str, end: str) -> None:
    compiler = grammar_compiler()
    params = StructuredOutputsParams(choice=["A"], thinking=Thinking(start, end))
    done = _complete_after_each(compiler, params, _ids(compiler, f"{start}x{end}A"))
    assert done[-1] and not any(done[:-1])


@pytest.mark.parametrize(
    ("constraint", "problem"),
    [
        ({"grammar": '%llguidance {"allow_initial_skip": true}\nstart: "a"'}, "%llguidance"),
        (
            {"grammar": '{"grammars": [{"lark_grammar": "start: \\"a\\""}], "max_tokens": 3}'},
            "max_tokens",
        ),
    ],
)
def test_a_constraint_whose_options_would_not_hold_after_thinking_is_refused(
    constraint: dict[str, str], problem: str
) -> None:
    compiler = grammar_compiler()
    compiler.matcher(StructuredOutputsParams(**constraint))  # fine without thinking
    with pytest.raises(InvalidSamplingParamsError, match=problem):
        compiler.matcher(StructuredOutputsParams(**constraint, thinking=Thinking()))


@pytest.mark.parametrize(
    "grammar",
    [
        '{"grammars": []}',
        '{"grammars": 5}',
        '{"grammars": [5]}',
        "{}",
        '{"grammars": null}',
        '{"grammars": [{"lark_grammar": 5}]}',
        '{"grammars": [{"lark_grammar": "start: \\"a\\""}]',  # not JSON
        '{"grammars": ' + "[" * 5000 + "]" * 5000 + "}",  # deeper than Python parses
    ],
)
def test_a_malformed_json_grammar_is_refused_after_thinking_as_without(grammar: str) -> None:
    """It had raised IndexError, TypeError, KeyError (a 500 from the server) with thinking."""
    compiler = grammar_compiler()
    with pytest.raises(InvalidSamplingParamsError):
        compiler.matcher(StructuredOutputsParams(grammar=grammar))
    with pytest.raises(InvalidSamplingParamsError):
        compiler.matcher(StructuredOutputsParams(grammar=grammar, thinking=Thinking()))


def test_a_constraint_that_does_not_compile_is_refused_with_its_own_error() -> None:
    params = StructuredOutputsParams(grammar="start: undefined_rule", thinking=Thinking())
    with pytest.raises(InvalidSamplingParamsError, match="undefined_rule") as refused:
        grammar_compiler().matcher(params)
    assert "thinking" not in str(refused.value) and "medha_constraint" not in str(refused.value)


def test_a_tag_holding_an_added_token_and_more_is_refused(tmp_path: Path) -> None:
    compiler = _token_tags_compiler(tmp_path)
    params = StructuredOutputsParams(regex="x", thinking=Thinking(end="</think>\n"))
    with pytest.raises(InvalidSamplingParamsError, match="one added token"):
        compiler.matcher(params)


def test_an_end_of_sequence_tag_is_refused() -> None:
    """llguidance reads eos as the output's end, never as a tag: thinking ran to max_tokens."""
    params = StructuredOutputsParams(regex="x", thinking=Thinking(end=EOS_TOKEN))
    with pytest.raises(InvalidSamplingParamsError, match="end-of-sequence"):
        grammar_compiler().matcher(params)


@pytest.mark.parametrize(
    ("thinking", "problem"),
    [
        ({"start": ""}, "thinking.start"),
        ({"end": 3}, "thinking.end"),
        ({"start": "<t>", "end": "<t>"}, "must differ"),
        ({"opened": "yes"}, "thinking.opened"),
        ({"stop": "</t>"}, "unknown field"),
        ("<think>", "medha.Thinking"),
        (True, "or False"),
    ],
)
def test_bad_thinking_is_refused_before_anything_compiles(thinking: Any, problem: str) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=problem):
        StructuredOutputsParams(regex="x", thinking=thinking)


def _allowed(mask: Any) -> set[int]:
    import numpy as np

    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return {int(t) for t in np.nonzero(bits)[0]}
