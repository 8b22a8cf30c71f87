"""GrammarCompiler and GrammarMatcher over the tiny model's tokenizer: masks allow exactly the
tokens that keep the output valid (checked against the tokens' own text), choices match
character for character, compiled grammars are shared but matchers are not, and a token the
grammar refuses is an error of that request."""

from __future__ import annotations

import re

import numpy as np
import pytest

from medha import GrammarViolationError, InvalidSamplingParamsError, StructuredOutputsParams
from medha.grammar import GrammarCompiler, GrammarMatcher
from tests.engine_support import grammar_compiler


def _allowed(matcher: GrammarMatcher) -> set[int]:
    bits = np.unpackbits(matcher.next_mask().view(np.uint8), bitorder="little")
    return {int(t) for t in np.nonzero(bits)[0]}


def _tokenizer():  # type: ignore[no-untyped-def]
    return grammar_compiler()._tokenizer


def test_a_regex_mask_allows_exactly_the_tokens_whose_text_can_start_a_match() -> None:
    matcher = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]{2}x"))
    tokenizer = _tokenizer()
    expected = {
        token
        for token in range(tokenizer.vocab_size)
        if (text := tokenizer.decode([token], skip_special_tokens=False))
        and re.fullmatch(r"[0-9]{1,2}|[0-9]{2}x", text)
    }
    assert expected and _allowed(matcher) == expected


def _spell(matcher: GrammarMatcher, text: str) -> list[bool]:
    """Feed `text`'s tokens; `complete` after each."""
    tokens = _tokenizer().encode(text, add_special_tokens=False)
    done = []
    for token in tokens:
        assert token in _allowed(matcher)
        matcher.accept(token)
        done.append(matcher.complete)
    return done


@pytest.mark.parametrize("choice", ['say "hi"', "back\\slash", "a|b(c)*", "ünï"])
def test_each_choice_is_matched_literally_and_completes_the_output(choice: str) -> None:
    choices = ['say "hi"', "back\\slash", "a|b(c)*", "ünï"]
    matcher = grammar_compiler().matcher(StructuredOutputsParams(choice=choices))
    done = _spell(matcher, choice)
    assert done[-1] and not any(done[:-1])


def test_matchers_of_one_grammar_share_its_compilation_but_not_their_place() -> None:
    compiler = GrammarCompiler(_tokenizer(), grammar_compiler()._vocab_size)
    grammar = StructuredOutputsParams(json={"type": "boolean"})
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    assert len(compiler._compiled) == 1
    assert _spell(first, "true")[-1]
    assert not second.complete and _allowed(second) == _allowed(compiler.matcher(grammar))


def test_a_token_the_grammar_refuses_is_a_grammar_violation() -> None:
    matcher = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))
    letter = _tokenizer().encode("x", add_special_tokens=False)[0]
    with pytest.raises(GrammarViolationError, match=f"token {letter}"):
        matcher.accept(letter)
    outside = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))
    with pytest.raises(GrammarViolationError):
        outside.accept(10**6)


def test_an_accepting_grammar_allows_eos_and_eos_completes_it() -> None:
    matcher = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))
    eos = set(_tokenizer().eos_token_ids)  # the tokenizer's and config.json's
    assert len(eos) == 2 and not eos & _allowed(matcher)
    assert _spell(matcher, "7") == [False]  # more digits may follow
    assert eos <= _allowed(matcher)
    matcher.accept(max(eos))
    assert matcher.complete


def test_a_gbnf_grammar_means_what_its_lark_twin_means() -> None:
    """llama.cpp's GBNF, as vLLM takes it beside Lark (its llguidance backend converts it)."""
    gbnf = 'root ::= "a" digits\ndigits ::= [0-9]+'
    lark = 'start: "a" DIGITS\nDIGITS: /[0-9]+/'
    for grammar in (gbnf, lark):
        matcher = grammar_compiler().matcher(StructuredOutputsParams(grammar=grammar))
        assert _spell(matcher, "a42") == [False, False, False]  # more digits may follow
        refused = grammar_compiler().matcher(StructuredOutputsParams(grammar=grammar))
        (b,) = _tokenizer().encode("b", add_special_tokens=False)
        with pytest.raises(GrammarViolationError):
            refused.accept(b)


def test_telling_gbnf_from_lark_takes_time_linear_in_the_grammar() -> None:
    """A rule's start read across lines had made 30,000 blank lines cost ~9 s (quadratic), on
    the event loop, before the compile cache; linear, it is milliseconds."""
    import time

    from medha.grammar import _GBNF_RULE

    blank = 'start: "a"\n' + " \n" * 30_000
    started = time.perf_counter()
    assert _GBNF_RULE.search(blank) is None
    assert time.perf_counter() - started < 2.0
    assert _GBNF_RULE.search('start: "a"\n\t root-2 ::= "b"')


def test_a_grammar_with_no_complete_output_ends_in_a_violation_not_a_stop() -> None:
    """It compiles, but after "a" nothing can complete it: llguidance's mask then allows only
    eos, which it accepts and stops at. That had read as the output completed ("stop")."""
    matcher = grammar_compiler().matcher(StructuredOutputsParams(grammar='start: "a" b\nb: b "x"'))
    (a,) = _tokenizer().encode("a", add_special_tokens=False)
    assert not matcher.advance(a)
    eos = set(_tokenizer().eos_token_ids)
    assert _allowed(matcher) <= eos
    with pytest.raises(GrammarViolationError, match="cannot go on"):
        matcher.advance(max(eos & _allowed(matcher)))
    assert not matcher.complete


def _nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "structured",
    [
        StructuredOutputsParams(regex="(a"),
        StructuredOutputsParams(grammar="start: rule_that_is_not_there"),
        StructuredOutputsParams(json={"type": "object", "minProperties": "two"}),
        StructuredOutputsParams(json=_nested(300)),
        StructuredOutputsParams(regex="a\ud800"),
        StructuredOutputsParams(choice=["\udfff"]),
        StructuredOutputsParams(grammar='root ::= ("a"'),
    ],
    ids=[
        "regex",
        "lark",
        "schema",
        "schema-too-deep",
        "regex-surrogate",
        "choice-surrogate",
        "gbnf",
    ],
)
def test_a_grammar_that_does_not_compile_is_an_invalid_sampling_params_error(
    structured: StructuredOutputsParams,
) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=f"\\({structured.kind}\\) does not"):
        grammar_compiler().matcher(structured)


def test_an_ignore_eos_matcher_keeps_eos_out_while_the_grammar_can_go_on() -> None:
    eos = tuple(_tokenizer().eos_token_ids)
    matcher = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"), banned=eos)
    assert _spell(matcher, "7") == [False]
    allowed = _allowed(matcher)
    assert allowed and not set(eos) & allowed
    # A ban that would leave nothing is not applied: here only eos may follow.
    done = grammar_compiler().matcher(StructuredOutputsParams(regex="x"), banned=eos)
    assert _spell(done, "x") == [True]
    assert set(eos) <= _allowed(done)


def test_compact_and_flexible_json_of_one_schema_are_two_grammars() -> None:
    compiler = GrammarCompiler(_tokenizer(), grammar_compiler()._vocab_size)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    flexible = compiler.matcher(StructuredOutputsParams(json=schema))
    compact = compiler.matcher(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    assert len(compiler._compiled) == 2
    space = _tokenizer().encode(" ", add_special_tokens=False)[0]
    _spell(flexible, "{")
    _spell(compact, "{")
    assert space in _allowed(flexible) and space not in _allowed(compact)


def test_a_grammar_whose_first_mask_fails_is_refused_at_compile_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # llguidance builds its lexer lazily: a limit may first show in a mask. Such an error is
    # what `error` reports once the matcher cannot go on, as after a refused token:
    broken = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))
    assert broken.error == ""
    with pytest.raises(GrammarViolationError):
        broken.accept(_tokenizer().encode("x", add_special_tokens=False)[0])
    assert broken.error
    # ...and where the first mask shows one, the request is refused before it is queued.
    monkeypatch.setattr(GrammarMatcher, "error", property(lambda self: "lexer too complex"))
    with pytest.raises(InvalidSamplingParamsError, match="does not compile: lexer too complex"):
        grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))


@pytest.mark.parametrize("special", ["<|im_end|>", "<|end_of_text|>"])  # the second is eos
@pytest.mark.parametrize("kind", ["choice", "regex", "prefixed"])
def test_forced_text_of_a_special_token_is_spelled_out_not_refused(special: str, kind: str) -> None:
    # llguidance's mask allows the special token its tokenizer makes of forced text, which
    # its parser then refuses (medha.grammar_specials): the mask keeps only what the parser
    # takes, and the text is written as the tokens of its characters.
    tokenizer = _tokenizer()
    (token,) = tokenizer.encode(special, add_special_tokens=False)
    text = {"choice": special, "regex": special, "prefixed": f"Answer: {special}"}[kind]
    params = (
        StructuredOutputsParams(regex=re.escape(text))
        if kind == "regex"
        else StructuredOutputsParams(choice=[text, "no"])
    )
    matcher = grammar_compiler().matcher(params)
    written: list[int] = []
    while not matcher.complete:
        allowed = _allowed(matcher)
        assert token not in allowed
        # The special tokens first, as a model likely picks the marker it knows.
        pick = min(allowed, key=lambda t: (t not in tokenizer.special_token_ids, t))
        matcher.accept(pick)
        written.append(pick)
        assert len(written) < 40
    assert tokenizer.decode(written, skip_special_tokens=False) == text


def test_a_special_token_the_grammar_takes_as_a_token_stays_allowed() -> None:
    # Thinking tags that are added tokens are read as tokens (medha.thinking_grammar), and
    # eos ends an output that may end: the parser takes both, so the masks keep them.
    tokenizer = _tokenizer()
    (start,) = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    thinking = {"start": "<|im_start|>", "end": "<|begin_of_text|>"}  # <|im_end|> is an eos
    params = StructuredOutputsParams(choice=["ok"], thinking=thinking)
    matcher = grammar_compiler().matcher(params)
    assert start in _allowed(matcher)
    ending = grammar_compiler().matcher(StructuredOutputsParams(regex="[0-9]+"))
    _spell(ending, "7")
    assert set(tokenizer.eos_token_ids) <= _allowed(ending)
