"""Special tokens in forced text, where llguidance's mask and its parser disagree.

Where a grammar forces text (a choice, a literal), llguidance's mask allows the tokens its
tokenizer makes of that text. That tokenizer, as the model's, turns the text of a special token
("<|im_end|>") into the token itself; but the parser reads a special token as no text, so it
refuses the very token the mask allowed, and the request would end with a GrammarViolationError
(llguidance issue #366 is the same disagreement, for text its tokenizer normalises). So a
special token a mask allows stays only if the parser would take it (`validate_tokens`: the
thinking tags medha.thinking_grammar reads as tokens do), and where that leaves nothing, the
forced text is spelled out: the first token the model's tokenizer makes of it with special
tokens split, as a model writes the marker as text.
"""

from __future__ import annotations

from copy import copy
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import llguidance
    from numpy.typing import NDArray

    from medha.model.tokenizer import Tokenizer


class ForcedSpecials:
    """The model's special tokens, and its tokenizer with special tokens split. Eos is one:
    a mask allows it where the output may end, and there the parser takes it; where a grammar
    forces eos's text ("<|im_end|>" in a choice), not."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        specials = tokenizer.special_token_ids | set(tokenizer.eos_token_ids)
        self._ids = np.array(sorted(specials), dtype=np.int64)
        backend = getattr(tokenizer.hf_tokenizer, "backend_tokenizer", None)
        self._spelling = None if backend is None else copy(backend)
        if self._spelling is not None:
            self._spelling.encode_special_tokens = True
            self._spelling.no_padding()
            self._spelling.no_truncation()

    def repair(self, matcher: llguidance.LLMatcher, mask: NDArray[np.int32]) -> NDArray[np.int32]:
        """`mask` (one bit per token, as GrammarMatcher's) without the special tokens
        `matcher` would refuse; when that leaves none, the first token of the forced text
        spelled out (if the matcher takes it)."""
        if matcher.is_stopped():
            return mask  # the output is complete: eos, all the mask allows, ends it
        words = mask.view(np.uint32)
        ids = self._ids[self._ids < 32 * len(words)]
        allowed = ids[((words[ids >> 5] >> (ids & 31)) & 1).astype(bool)]
        refused = [int(t) for t in allowed if matcher.validate_tokens([int(t)]) == 0]
        if not refused:
            return mask
        words = words.copy()
        for token in refused:
            words[token >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (token & 31)))
        if not words.any():
            spelled = self._first_spelled(matcher)
            if spelled is not None and spelled < 32 * len(words):
                words[spelled >> 5] |= np.uint32(1 << (spelled & 31))
        return words.view(np.int32)

    def _first_spelled(self, matcher: llguidance.LLMatcher) -> int | None:
        if self._spelling is None:
            return None
        try:
            text = matcher.compute_ff_bytes().decode("utf-8")
        except UnicodeDecodeError:  # forced bytes that end inside a character
            return None
        ids = self._spelling.encode(text, add_special_tokens=False).ids
        if ids and matcher.validate_tokens(ids[:1]) == 1:
            return int(ids[0])
        return None
