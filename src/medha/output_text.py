"""Per request: generated token ids in, streamable text and the finish reason out.

Joins the incremental detokenizer (never emit half a UTF-8 character) and the stop checker
(eos, stop tokens, stop strings across token boundaries, max_tokens) in the one order that is
right: detokenize first, then let the stop checker decide what of that text may be shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from medha.detokenizer import Decoder, IncrementalDetokenizer
from medha.sampling import SamplingParams
from medha.stopping import StopChecker, StopUpdate


class OutputText:
    """Feed it each generated token; it returns the text to stream and whether to stop."""

    __slots__ = ("_detokenizer", "_stop")

    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        max_tokens: int | None = None,
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(
            decoder, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )
        self._stop = StopChecker(params, tuple(eos_token_ids), max_tokens)

    def push(self, token_id: int, complete: bool = False) -> StopUpdate:
        """Account for one generated token; `complete`: it completed the request's structured
        output, which ends the request."""
        # A hidden token's text is never shown, so it never reaches the detokenizer: there its
        # bytes could complete, or be flushed with, bytes that earlier tokens left unfinished.
        delta = "" if self._stop.hides(token_id) else self._detokenizer.step(token_id)
        # A token that ends the request (eos, stop token, length, a completed grammar) releases
        # what the detokenizer still holds (bytes that never formed a whole character: U+FFFD),
        # scanned for stop strings with the rest: the text must not depend on where it ends.
        tail = self._detokenizer.flush() if self._stop.ends_with(token_id, complete) else ""
        return self._stop.update(token_id, delta, complete, tail)

    def release_held(self) -> str:
        """At an abort: the text held back so far (a possible start of a stop string, then
        bytes that never formed a whole character), so that the deltas add up to everything
        generated, as when a request ends by a token."""
        return self._stop.held_text + self._detokenizer.flush()
