"""Structured outputs on the engine side: compile a request's constraint, and each step say which
tokens may come next.

As in vLLM V1, the grammar state lives with the scheduler, not with the sampler: the scheduler
actor sees every sampled token first (it streams them), so it advances the request's matcher
there and ships the next step's allowed tokens as a bitmask with the step (one bit per token:
6 KB for a 49K vocabulary). The sampling stage, in this process or another, only applies it:
it needs no tokenizer and keeps no grammar state, and a preempted request's matcher simply
waits, since its output tokens are kept.

llguidance (Microsoft's Rust grammar engine, which vLLM also ships) does the work: JSON schemas
and regexes compile to a lazy lexer plus an Earley parser, and a mask over the whole vocabulary
takes ~50 us for schemas like a tool call's (benchmarks/structured_outputs.py). A pathological
grammar costs more (a regex repeating 100,000 times: ~50 ms a mask), on the event loop.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import numpy as np

from medha.errors import GrammarViolationError, InvalidSamplingParamsError
from medha.grammar_specials import ForcedSpecials
from medha.structured_outputs import StructuredOutputsParams
from medha.thinking_grammar import with_thinking

if TYPE_CHECKING:
    import llguidance
    from numpy.typing import NDArray

    from medha.model.tokenizer import Tokenizer

_MAX_CACHED_GRAMMARS = 64
"""Compiled grammars kept for reuse: an agent sends the same tool schema again and again."""


class GrammarMatcher:
    """One request's position in its grammar. `banned`: tokens never allowed while another
    one is (eos, for a request with ignore_eos: its output goes on until the grammar ends)."""

    __slots__ = ("_banned", "_mask", "_matcher", "_specials", "_words")

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        words: int,
        banned: tuple[int, ...] = (),
        specials: ForcedSpecials | None = None,
    ) -> None:
        self._matcher = matcher
        self._words = words
        self._banned = banned
        self._specials = specials
        """The model's special tokens, which a mask may allow where the parser refuses them
        (medha.grammar_specials)."""
        self._mask: NDArray[np.int32] | None = None
        """The mask of the current position, once computed (a step reads it, never writes)."""

    def next_mask(self) -> NDArray[np.int32]:
        """The tokens allowed next, one bit each (token t: bit t % 32 of word t // 32)."""
        if self._mask is None:
            import llguidance.numpy

            mask = llguidance.numpy.allocate_token_bitmask(1, 32 * self._words)
            llguidance.numpy.fill_next_token_bitmask(self._matcher, mask, 0)
            allowed = mask[0]
            if self._specials is not None:
                allowed = self._specials.repair(self._matcher, allowed)
            self._mask = _without(allowed, self._banned)
        return self._mask

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`, which the last mask allowed."""
        self._mask = None
        try:
            accepted = self._matcher.consume_token(token_id)
        except Exception as exc:  # an id outside the tokenizer: llguidance refuses the call
            raise GrammarViolationError(f"token {token_id}: {exc}") from exc
        if not accepted:
            # Its first line says why; the rest is the parser's state and the whole grammar.
            reason = self._matcher.get_error().strip().split("\n")[0] or "not allowed here"
            raise GrammarViolationError(
                f"token {token_id} breaks the request's structured output: {reason}"
            )

    @property
    def error(self) -> str:
        """Why the grammar cannot go on (a limit of the grammar engine hit), else ""."""
        return str(self._matcher.get_error()) if self._matcher.is_error() else ""

    def advance(self, token_id: int) -> bool:
        """Accept a sampled token; whether the output is now complete. GrammarViolationError
        where the grammar cannot go on: a grammar with no complete output (`b: b "x"`) or a
        limit of the grammar engine, found on the way (its mask then allows only eos)."""
        self.accept(token_id)
        if self._matcher.is_error():
            reason = self._matcher.get_error().strip().split("\n")[0]
            raise GrammarViolationError(f"the structured output cannot go on: {reason}")
        return self.complete

    @property
    def complete(self) -> bool:
        """The output is complete: nothing may follow it (but eos)."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers for one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: dict[str, llguidance.LLMatcher] = {}
        self._specials: ForcedSpecials | None = None

    def matcher(
        self, params: StructuredOutputsParams, banned: tuple[int, ...] = ()
    ) -> GrammarMatcher:
        """A fresh matcher at the start of `params`' grammar (`banned`: see GrammarMatcher).
        InvalidSamplingParamsError if it does not compile (a bad regex, an unsupported schema
        feature, a grammar error, a limit of the grammar engine)."""
        try:
            grammar = _grammar_text(params)
        except ValueError as exc:  # a schema nested too deep, a lone surrogate in the text
            raise _refused(params, str(exc)) from exc
        if params.thinking:
            try:
                grammar = with_thinking(grammar, params.thinking, self._tag_token)
            except ValueError as exc:  # a constraint or tags it cannot wrap
                raise _refused(params, str(exc)) from exc
        compiled = self._compiled_grammar(grammar, params)
        words = (self._llguidance_tokenizer().vocab_size + 31) // 32
        assert self._specials is not None  # built with the llguidance tokenizer
        matcher = GrammarMatcher(compiled.deep_copy(), words, banned, self._specials)
        # The first mask now: what the lexer builds lazily may hit a limit, which is better
        # refused here than found mid-request (and the first step reuses it).
        matcher.next_mask()
        if matcher.error:
            raise _refused(params, matcher.error)
        return matcher

    def _compiled_grammar(
        self, grammar: str, params: StructuredOutputsParams
    ) -> llguidance.LLMatcher:
        """`grammar` compiled (or from the cache); InvalidSamplingParamsError if it does not
        compile."""
        import llguidance

        compiled = self._compiled.get(grammar)
        if compiled is None:
            tokenizer = self._llguidance_tokenizer()
            try:
                compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            except ValueError as exc:
                raise _refused(params, str(exc)) from exc
            if compiled.is_error():
                raise _refused(params, compiled.get_error())
            if len(self._compiled) >= _MAX_CACHED_GRAMMARS:
                self._compiled.clear()
            self._compiled[grammar] = compiled
        return compiled

    def _tag_token(self, tag: str) -> int | None:
        """The token that a thinking tag is, where llguidance reads it as a token and not as
        text (an added token: medha.thinking_grammar); else None (text). ValueError for a tag
        that holds such a token and more, or is eos: the grammar could never read it."""
        ids = self._tokenizer.encode(tag, add_special_tokens=False)
        special = [t for t in ids if self._llguidance_tokenizer().is_special_token(t)]
        if special and len(ids) > 1:
            raise ValueError(
                f"the thinking tag {tag!r} holds the added token "
                f"{self._tokenizer.decode(special[:1], skip_special_tokens=False)!r} and more; "
                "a tag must be one added token, or text without any"
            )
        if special and special[0] in self._tokenizer.eos_token_ids:
            # llguidance reads eos as the output's end, never as a tag: thinking could not end.
            raise ValueError(f"the thinking tag {tag!r} is the model's end-of-sequence token")
        return special[0] if special else None

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use, as vLLM does, then kept: 0.5 s for a 49K vocabulary on a CPU
        # core, most of it holding the GIL (a thread would not spare the event loop), so an
        # engine that never sees a structured output never pays it. The forced-specials table
        # is built with it (~150 ms: a copy of the HF tokenizer), so that every once-per-engine
        # cost falls here, not on whichever grammar happens to compile first.
        if self._ll_tokenizer is None:
            self._ll_tokenizer = self._build_llguidance_tokenizer()
            self._specials = ForcedSpecials(self._tokenizer)
        return self._ll_tokenizer

    def _build_llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance.hf
        from transformers import PreTrainedTokenizerFast

        tokenizer = self._tokenizer
        hf_tokenizer = tokenizer.hf_tokenizer
        if not isinstance(hf_tokenizer, PreTrainedTokenizerFast):
            raise InvalidSamplingParamsError(
                "structured outputs need the model's fast tokenizer (a tokenizer.json); "
                f"this model's is a {type(hf_tokenizer).__name__}"
            )
        try:
            return llguidance.hf.from_tokenizer(
                hf_tokenizer,
                # The model's logits may be padded past the tokenizer's ids (never allowed); a
                # tokenizer may also hold ids the model lacks (their bits go unused).
                n_vocab=max(self._vocab_size, tokenizer.vocab_size),
                eos_token=list(tokenizer.eos_token_ids),
            )
        except ValueError as exc:
            raise InvalidSamplingParamsError(
                f"structured outputs cannot use this model's tokenizer: {exc}"
            ) from exc


def _refused(params: StructuredOutputsParams, message: str) -> InvalidSamplingParamsError:
    return InvalidSamplingParamsError(
        f"SamplingParams.structured_outputs ({params.kind}) does not compile: {_one_line(message)}"
    )


def _without(mask: NDArray[np.int32], banned: tuple[int, ...]) -> NDArray[np.int32]:
    """`mask` with the `banned` tokens' bits cleared, unless that leaves none set."""
    if not banned:
        return mask
    words = mask.view(np.uint32).copy()
    for token in banned:
        if token < 32 * len(words):
            words[token >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (token & 31)))
    return words.view(np.int32) if words.any() else mask


def _one_line(message: str) -> str:
    """llguidance's error on one line: its lines joined, the caret lines that point into the
    one above dropped (a log line or a CLI error stays one line)."""
    lines = (line.strip() for line in message.splitlines())
    return "; ".join(line for line in lines if set(line) - set("^ "))


def _grammar_text(params: StructuredOutputsParams) -> str:
    """`params` as an llguidance grammar."""
    from llguidance import LLMatcher

    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json or '{"type": "object"}'  # json_object: any object
        return LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": not params.disable_any_whitespace}
        )
    if kind == "regex":
        assert params.regex is not None
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        assert params.choice is not None
        # Lark string literals take JSON's escapes: a choice is matched character for
        # character, quotes, backslashes and regex characters included.
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        )
    assert params.grammar is not None
    grammar = params.grammar
    if _GBNF_RULE.search(grammar):
        from llguidance import grammar_from

        # llama.cpp's GBNF (`root ::= ...`), turned into Lark, as vLLM's llguidance backend
        # takes it; the conversion's empty options line says nothing.
        grammar = grammar_from("gbnf", grammar).removeprefix("%llguidance {}\n")
    return LLMatcher.grammar_from_lark(grammar)


_GBNF_RULE = re.compile(r"^[ \t]*[A-Za-z_][\w-]*[ \t]*::=", re.MULTILINE)
"""A line that starts a GBNF rule (a Lark rule is `name:`). Not `\\s*`, which crosses lines:
a long run of blank lines then cost time quadratic in it (a 60 KB grammar, 9 s on the loop)."""
