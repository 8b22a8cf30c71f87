"""StopChecker: when a request ends, and which text may be streamed before it does.

Per request, per generated token: eos, stop token ids, stop strings and max_tokens, with
vLLM's semantics:

- eos ends the request ("stop") unless ignore_eos; a token in stop_token_ids always ends it
  ("stop"). The text of the token that ended it is emitted only with include_stop_str_in_output
  (as vLLM does; an eos that is a special token has text only without skip_special_tokens).
- a stop string ends the request ("stop") as soon as it is complete in the text, even when it
  spans several tokens. The emitted text ends right before it (or right after it with
  include_stop_str_in_output), and nothing generated after it is emitted. While the text ends
  with something that could still become a stop string, that suffix is held back; it is
  released once it can no longer match, or when the request ends for another reason.
- max_tokens ends the request ("length") unless it ended with "stop" on the same token.
- a token that completes the request's structured output ends it ("stop", matched None), even
  within min_tokens: the grammar allows nothing more. Its text is emitted, held text included.
- min_tokens m: the first m tokens never end the request (vLLM V1): the sampler keeps eos and
  stop tokens from being sampled meanwhile, and a stop string counts only if it ends in the text
  of token m + 1 or later (it may begin earlier, so a possible start of one is held back
  meanwhile as well).

Which stop string wins when several could: the one that completes first in the text (earliest
end), so the result does not depend on how the text was split into tokens; among those, the
first in `stop`, as recent vLLM releases (stop=["b", "ab"] cuts "xyab" to "xya"; older ones
took the first in `stop` found in the new text, which differs where one token completes two).

Pure Python, O(len(delta) * number of stop strings) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from medha.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class StopUpdate:
    """What one token changes: text that may be streamed now, and whether the request ended."""

    text: str
    # None while the request goes on, else "stop" or "length".
    finish_reason: str | None = None
    # The stop string or the stop/eos token id that ended the request, else None.
    matched: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Tracks one request's stop conditions; call `update` once per generated token."""

    __slots__ = (
        "_eos_token_ids",
        "_finished",
        "_generated",
        "_held",
        "_include_stop",
        "_longest_prefix",
        "_max_tokens",
        "_min_tokens",
        "_stale",
        "_stop_prefixes",
        "_stop_strings",
        "_stop_token_ids",
    )

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        max_tokens: int | None = None,
    ) -> None:
        """`max_tokens` overrides params.max_tokens, and is required where that is None (the
        engine works out what the context leaves)."""
        limit = params.max_tokens if max_tokens is None else max_tokens
        if limit is None:
            raise ValueError("params.max_tokens is None: pass the limit as max_tokens")
        if limit < 1:
            raise ValueError(f"max_tokens must be >= 1, got {limit}")
        self._max_tokens = limit
        self._min_tokens = params.min_tokens
        self._eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._stop_strings = params.stop
        self._include_stop = params.include_stop_str_in_output
        # Every proper prefix of a stop string: a text ending in one may still become a match.
        self._stop_prefixes = frozenset(s[:n] for s in params.stop for n in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in params.stop), default=0)
        self._held = ""
        # Leading characters of the held text that came from tokens before min_tokens ran out:
        # no stop string may end in them.
        self._stale = 0
        self._generated = 0
        self._finished = False

    @property
    def held_text(self) -> str:
        """Text received but not yet emitted (a possible start of a stop string)."""
        return self._held

    @property
    def num_generated(self) -> int:
        return self._generated

    def hides(self, token_id: int) -> bool:
        """Whether `token_id` ends the request without its own text: eos or a stop token,
        without include_stop_str_in_output."""
        if self._include_stop:
            return False
        return token_id in self._eos_token_ids or token_id in self._stop_token_ids

    def ends_with(self, token_id: int, complete: bool = False) -> bool:
        """Whether the next token, `token_id`, ends the request whatever text it brings: eos
        or a stop token past min_tokens, a completed structured output, or max_tokens."""
        upcoming = self._generated + 1
        if complete or upcoming >= self._max_tokens:
            return True
        ends = token_id in self._eos_token_ids or token_id in self._stop_token_ids
        return ends and upcoming > self._min_tokens

    def update(
        self, token_id: int, text_delta: str, complete: bool = False, tail: str = ""
    ) -> StopUpdate:
        """Account for one generated token and the text delta its detokenization produced.
        `complete`: the token completed the request's structured output, so nothing may
        follow: the request ends ("stop", or an earlier stop string's match). `tail`: text
        released because the token ends the request (`ends_with`), after the delta; a stop
        string may end in it too."""
        if self._finished:
            raise RuntimeError("StopChecker.update called after the request finished")
        self._generated += 1
        checking = self._generated > self._min_tokens

        matched: str | int | None = None
        if token_id in self._eos_token_ids or token_id in self._stop_token_ids:
            if checking:
                matched = token_id
            if not self._include_stop:
                text_delta = ""

        text = self._held + text_delta + tail
        text, stop_string = self._scan(text, self._stale if checking else len(text))
        if stop_string is not None:
            return self._finish(text, FINISH_STOP, stop_string)
        if matched is not None or complete:
            return self._finish(text + self._held, FINISH_STOP, matched)
        if self._generated >= self._max_tokens:
            return self._finish(text + self._held, FINISH_LENGTH, None)
        return StopUpdate(text=text)

    def _scan(self, text: str, stale: int) -> tuple[str, str | None]:
        """Split `text` into (emittable now, matched stop string or None); sets self._held. A
        match must end past the first `stale` characters (text of the tokens before
        min_tokens ran out); a possible start of a stop string is held back all the same."""
        best: tuple[int, str] | None = None  # (end, stop string): the first to end, in order
        for stop in self._stop_strings:
            start = text.find(stop, max(0, stale - len(stop) + 1))
            if start != -1 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), stop)
        if best is not None:
            end, stop = best
            self._held = ""
            self._stale = 0
            return (text[:end] if self._include_stop else text[: end - len(stop)]), stop
        held = self._longest_stop_prefix_suffix(text)
        emitted = len(text) - held
        self._held = text[emitted:]
        self._stale = max(0, stale - emitted)
        return text[:emitted], None

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        for length in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-length:] in self._stop_prefixes:
                return length
        return 0

    def _finish(self, text: str, reason: str, matched: str | int | None) -> StopUpdate:
        self._finished = True
        self._held = ""
        return StopUpdate(text=text, finish_reason=reason, matched=matched)
