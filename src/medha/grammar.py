"""Structured outputs on the engine side: compile a request's constraint, and each step say which
tokens may come next.

As in vLLM V1, the grammar state lives with the scheduler, not with the sampler: the scheduler
actor sees every sampled token first (it streams them), so it advances the request's matcher
there and ships the next step's allowed tokens as a bitmask with the step (one bit per token:
6 KB for a 49K vocabulary). The sampling stage, in this process or another, only applies it:
it needs no tokenizer and keeps no grammar state, and a preempted request's matcher simply
waits, since its output tokens are kept.

llguidance (Microsoft's Rust grammar engine, which vLLM also ships) does the work: JSON schemas
and regexes compile to a lazy lexer plus an Earley parser, and a mask over the whole
vocabulary takes tens of microseconds, however large the grammar.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from medha.errors import GrammarViolationError, InvalidSamplingParamsError
from medha.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance
    from numpy.typing import NDArray

    from medha.model.tokenizer import Tokenizer

_MAX_CACHED_GRAMMARS = 64
"""Compiled grammars kept for reuse: an agent sends the same tool schema again and again."""


class GrammarMatcher:
    """One request's position in its grammar."""

    __slots__ = ("_matcher", "_words")

    def __init__(self, matcher: llguidance.LLMatcher, words: int) -> None:
        self._matcher = matcher
        self._words = words

    def next_mask(self) -> NDArray[np.int32]:
        """The tokens allowed next, one bit each (token t: bit t % 32 of word t // 32)."""
        import llguidance.numpy

        mask = llguidance.numpy.allocate_token_bitmask(1, 32 * self._words)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, mask, 0)
        row: NDArray[np.int32] = mask[0]
        return row

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`, which the last mask allowed."""
        try:
            accepted = self._matcher.consume_token(token_id)
        except Exception as exc:  # an id outside the tokenizer: llguidance refuses the call
            raise GrammarViolationError(f"token {token_id}: {exc}") from exc
        if not accepted:
            raise GrammarViolationError(
                f"token {token_id} breaks the request's structured output: "
                f"{self._matcher.get_error() or 'not allowed here'}"
            )

    def advance(self, token_id: int) -> bool:
        """Accept a sampled token; whether the output is now complete."""
        self.accept(token_id)
        return self.complete

    @property
    def complete(self) -> bool:
        """The output is complete: nothing may follow it (but eos)."""
        return bool(self._matcher.is_stopped())


class GrammarCompiler:
    """Turns StructuredOutputsParams into matchers for one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: dict[str, llguidance.LLMatcher] = {}

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher at the start of `params`' grammar. InvalidSamplingParamsError if it
        does not compile (a bad regex, an unsupported schema feature, a grammar error)."""
        import llguidance

        grammar = _grammar_text(params)
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._llguidance_tokenizer(), grammar, log_level=0)
            if compiled.is_error():
                raise InvalidSamplingParamsError(
                    f"SamplingParams.structured_outputs ({params.kind}) does not compile: "
                    f"{_one_line(compiled.get_error())}"
                )
            if len(self._compiled) >= _MAX_CACHED_GRAMMARS:
                self._compiled.clear()
            self._compiled[grammar] = compiled
        words = (self._llguidance_tokenizer().vocab_size + 31) // 32
        return GrammarMatcher(compiled.deep_copy(), words)

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use, as vLLM does, then kept: 0.5 s for a 49K vocabulary on a CPU
        # core, most of it holding the GIL (a thread would not spare the event loop), so an
        # engine that never sees a structured output never pays it.
        if self._ll_tokenizer is None:
            self._ll_tokenizer = self._build_llguidance_tokenizer()
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
        return llguidance.hf.from_tokenizer(
            hf_tokenizer,
            # The model's logits may be padded past the tokenizer's ids (never allowed); a
            # tokenizer may also hold ids the model lacks (their bits go unused).
            n_vocab=max(self._vocab_size, tokenizer.vocab_size),
            eos_token=list(tokenizer.eos_token_ids),
        )


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
    return LLMatcher.grammar_from_lark(params.grammar)
