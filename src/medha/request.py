"""What callers see of a request: events while it streams, and the completion at the end."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class TokenIdArray(Protocol):
    """A 1-D numpy array or torch tensor of token ids: anything whose `tolist()` gives them."""

    def tolist(self) -> Any: ...


Prompt = str | Sequence[int] | TokenIdArray
"""What `Engine.stream`/`generate` take: text (tokenized without a chat template) or token ids."""


class TokenLogprob(NamedTuple):
    """One of the most likely tokens at a position, and its log-probability under the model."""

    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, streamed as soon as it is sampled; or the end of an aborted stream."""

    request_id: str
    token_id: int | None
    """The token; None only on the last event of a request aborted by `Engine.abort` (as
    vLLM's final output of an aborted request, it carries no new token)."""
    text: str
    """Text that became final with this token (may be empty: held back while it could still be
    part of a stop string or of a multi-byte character)."""
    finish_reason: str | None = None
    """None until the last event; then "stop" (eos, stop token or string), "length", or "abort"
    (`Engine.abort`; a stream its own consumer leaves gets no more events)."""
    logprob: float | None = None
    """Log-probability of the token under the model, when SamplingParams.logprobs is not None."""
    top_logprobs: tuple[TokenLogprob, ...] | None = None
    """With SamplingParams.logprobs = N: the N most likely tokens at this position, most likely
    first (the chosen token is among them only if it is one of them, as in OpenAI's API)."""
    prompt_logprobs: tuple[float | None, ...] | None = None
    """On a request's first event only, when SamplingParams.prompt_logprobs is not None: each
    prompt token's log-probability given the tokens before it (None for the first token)."""
    prompt_top_logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] | None = None
    """Alongside prompt_logprobs: the SamplingParams.prompt_logprobs most likely tokens at each
    prompt position (None for the first; empty with prompt_logprobs = 0)."""
    metrics: RequestMetrics | None = None
    """On the last event only (finish_reason set): the request's timings, as
    Completion.metrics (TTFT, TPOT, whether its deadline was met)."""


@dataclass(slots=True)
class RequestMetrics:
    """Timings of one request in seconds on the engine's clock: since the Engine was created,
    on time.monotonic (`Engine.now()` reads it)."""

    arrival: float
    deadline: float
    """Seconds after arrival by which the first token was due (the caller's, or the default
    max(1.5 x predicted prefill time, 0.5 s))."""
    deadline_given: bool = False
    cached_tokens: int = 0
    """Prompt tokens its prefill took from the prefix cache instead of computing them, as
    it first started (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than two tokens)."""
        if self.num_output_tokens < 2 or self.first_token_time is None:
            return None
        assert self.last_token_time is not None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival

    @property
    def deadline_met(self) -> bool | None:
        """Whether the first token came within the deadline (None before it came)."""
        ttft = self.ttft
        return None if ttft is None else ttft <= self.deadline

    def record_token(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.num_output_tokens += 1
        self.token_times.append(now)


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole result of a request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: RequestMetrics
    logprobs: list[float | None] | None = None
    """Each token's log-probability (SamplingParams.logprobs not None), else None."""
    top_logprobs: list[tuple[TokenLogprob, ...]] | None = None
    """Each token's most likely alternatives (SamplingParams.logprobs not None), else None."""
    prompt_logprobs: list[float | None] | None = None
    """Each prompt token's log-probability given the ones before it, None for the first
    (SamplingParams.prompt_logprobs not None), else None. A request aborted before its first
    token holds those computed so far."""
    prompt_top_logprobs: list[tuple[TokenLogprob, ...] | None] | None = None
    """The most likely tokens at each prompt position, as prompt_logprobs."""


def check_deadline(deadline: object) -> float | None:
    """Validate a caller's TTFT deadline (seconds, > 0, finite) or None."""
    from medha.errors import InvalidRequestError

    if deadline is None:
        return None
    # numbers.Real: numpy's numbers too (bool is an int, but never a deadline).
    if isinstance(deadline, bool) or not isinstance(deadline, numbers.Real):
        raise InvalidRequestError(f"deadline must be seconds (a number) or None, got {deadline!r}")
    if math.isnan(deadline) or math.isinf(deadline) or deadline <= 0:
        raise InvalidRequestError(
            f"deadline must be a finite number of seconds > 0, got {deadline}"
        )
    return float(deadline)
