"""Incremental detokenization: a stream of token ids in, a stream of text deltas out.

Two things make "decode the new token and append" wrong:

1. Byte-level BPE (and SentencePiece byte fallback) splits a multi-byte UTF-8 character across
   tokens. Decoding the first part yields U+FFFD; emitting it would put garbage in the stream.
2. Decoding a suffix is not the suffix of decoding the whole: SentencePiece/Metaspace decoders
   drop the leading space of the first token, WordPiece glues "##" pieces to their neighbour.

So, as vLLM does (its prefix_offset/read_offset technique), we decode a short WINDOW of recent
tokens that starts a few tokens before the unread ones, and emit the part of the window's text
that was not emitted yet. Text up to the trailing run of U+FFFD is final (everything before it
ends on a whole character); the trailing run is held back until a later token completes it.
When nothing is held back, the window slides forward to its last few tokens, so each step
decodes a bounded number of tokens: O(1) per token, never the whole output.

The concatenation of all deltas plus `flush()` equals `decode(all output ids)` for tokenizers
whose decode is prefix-consistent away from the window's start (byte-level BPE, SentencePiece,
WordPiece). Decoders that rewrite text already decoded cannot be streamed exactly by anyone
(vLLM included): HF's clean_up_tokenization_spaces, and SentencePiece byte fallback fed
INVALID bytes (it turns a whole run of byte tokens into U+FFFD, valid ones before included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# Tokens of context kept before the unread ones (vLLM uses 5): enough for a decoder's
# leading-space and "##" rules, and for a whole 4-byte character split into 1-byte tokens.
CONTEXT_TOKENS = 5

# A character is at most 4 bytes, so a run of replacement characters that lasts this many tokens
# is invalid bytes, not an unfinished character: emit it rather than let the window grow.
MAX_HELD_TOKENS = 64


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer (medha.model.tokenizer.Tokenizer fits).

    A decoder may also have `special_token_ids` (a collection of ints): the ids that
    skip_special_tokens removes before decoding. The detokenizer then leaves them out of its
    window, which is exact, and keeps a window's context made of tokens that have text.
    """

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, one `step` per token.

    `prompt_ids` gives the decoder context (only the last CONTEXT_TOKENS are kept), so that
    the first output token gets the leading space a SentencePiece decode of it alone would drop.
    The prompt's own text is never emitted.
    """

    __slots__ = (
        "_decoder",
        "_emitted",
        "_held_tokens",
        "_skip_special_tokens",
        "_skipped_ids",
        "_window",
    )

    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip_special_tokens = skip_special_tokens
        # Ids a skipping decode removes anyway. Kept out of the window: a run of them (an
        # ignore_eos request's eos tokens, a chat template's markers) would otherwise fill the
        # context, and a decoder that strips the first token's leading space (SentencePiece)
        # would strip it from the next word.
        self._skipped_ids = (
            frozenset(getattr(decoder, "special_token_ids", ()))
            if skip_special_tokens
            else frozenset()
        )
        # From the prompt's end: a long prompt's tail is all it takes.
        self._window: list[int] = []
        for token in reversed(prompt_ids):
            if len(self._window) == CONTEXT_TOKENS:
                break
            if token not in self._skipped_ids:
                self._window.append(token)
        self._window.reverse()
        # Characters of decode(self._window) already emitted (or belonging to the prompt).
        # A character the prompt left unfinished is emitted whole with the output.
        self._emitted = _final_length(self._decode(self._window)) if self._window else 0
        self._held_tokens = 0

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (maybe empty)."""
        if token_id in self._skipped_ids:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        final = _final_length(text)
        if final == len(text):
            delta = self._emit_up_to(text, final)
            self._slide(forced=False)
            return delta
        self._held_tokens += 1
        if self._held_tokens < MAX_HELD_TOKENS:
            return self._emit_up_to(text, final)
        # Invalid bytes: emit their replacement characters, all but the last, which may be
        # the start of a character the next tokens complete.
        delta = self._emit_up_to(text, len(text) - 1)
        self._slide(forced=True)
        return delta

    def flush(self) -> str:
        """At the end of the request: the held-back text (replacement characters of bytes that
        never formed a whole character), so that all deltas add up to decode(all ids)."""
        if not self._window:
            return ""
        text = self._decode(self._window)
        return self._emit_up_to(text, len(text))

    def _emit_up_to(self, text: str, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = text[self._emitted : end]
        self._emitted = end
        return delta

    def _slide(self, *, forced: bool) -> None:
        """Everything decoded so far is emitted (forced: all but the last character, which
        may still complete): restart the window at its last few tokens."""
        self._held_tokens = 0
        if len(self._window) <= 2 * CONTEXT_TOKENS:
            # Sliding costs one extra decode; doing it every CONTEXT_TOKENS steps amortises it.
            return
        window = self._window[-CONTEXT_TOKENS:]
        text = self._decode(window)
        if not text:
            # No context left (tokens without text a decoder without special_token_ids did
            # not let us skip): the next token's leading space would be stripped. Keep the
            # longer window; it is correct.
            return
        if forced:
            # The held character is unfinished: 3 bytes at most, so in the last 3 tokens when
            # each of them has bytes, and then it is the last character here too. A token with
            # no text (not skipped as special) would push its start out of the short window.
            if any(not self._decode([token]) for token in window[-3:]):
                return
            self._window = window
            self._emitted = len(text) - 1
            return
        if _final_length(text) < len(text):
            # The shorter window starts inside a character and its decoder made the END
            # unfinished (context-dependent output): keep the longer window, it is correct.
            return
        self._window = window
        self._emitted = len(text)

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _final_length(text: str) -> int:
    """Length of `text` without its trailing run of U+FFFD (bytes that may still complete)."""
    return len(text.rstrip(REPLACEMENT_CHAR))
