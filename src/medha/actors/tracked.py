"""The engine's record of one request: its tokens, output text state, metrics and the queue its
stream reads from. Owned by the scheduler actor once submitted."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from medha.model.prompt_scoring import PromptScores
from medha.output_text import OutputText
from medha.request import Completion, RequestMetrics, TokenEvent, TokenLogprob
from medha.sampling import SamplingParams, SamplingSetup
from medha.scheduler.prefix_cache import block_hashes
from medha.stopping import StopUpdate

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from medha.grammar import GrammarMatcher
    from medha.request_prompt import PreparedPrompt

StreamItem = TokenEvent | BaseException


@dataclass(eq=False)
class TrackedRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    """params.max_tokens, or what the context leaves where that is None."""
    output: OutputText
    metrics: RequestMetrics
    deadline: float | None
    """The caller's TTFT deadline in seconds, or None for the scheduler's default."""
    eos_token_ids: tuple[int, ...] = ()
    """The tokenizer's, for min_tokens (the sampling stage keeps them from being sampled)."""
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    """params.bad_words as token ids (medha.sampling.bad_words_token_ids)."""
    grammar: GrammarMatcher | None = None
    """Where its output is in params.structured_outputs; None without one."""
    hash_block_size: int = 0
    """Tokens per block of its prefix caching digests; 0: prefix caching is off."""
    block_hashes: tuple[bytes, ...] = ()
    """Digests of its full blocks, for prefix caching: the prompt's, then those its output
    fills (`new_block_hashes`)."""
    hash_root: bytes = b""
    """The digest its first block chains from (its cache salt's: prefix_cache.salted_root)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    """With params.prompt_logprobs: those of its prompt tokens so far (None for the first)."""
    prompt_top_logprobs: list[tuple[TokenLogprob, ...] | None] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    sampling_sent: bool = False
    preemptions: int = 0
    abandoned: bool = False
    """Its stream ended before the request did (the consumer left): the id is free again."""
    aborting: bool = False
    """Engine.abort asked for its end, which follows: the id is free again at once (as vLLM's
    AsyncLLM.abort frees it)."""
    submitted: bool = False
    """Handed to the scheduler actor (its stream's iteration started)."""
    unprepared_prompt: object = None
    """A long prompt as the caller gave it, until its stream prepares it off the event loop
    (medha.request_prompt); meanwhile prompt_ids, max_new_tokens, output and block_hashes
    are placeholders, and the request is not submitted."""
    stop_preparing: Callable[[], object] | None = field(default=None, repr=False)
    """While its stream waits for its long prompt to be prepared: ends that wait (an abort,
    the engine stopping)."""
    on_end: Callable[[TrackedRequest, str], object] | None = field(default=None, repr=False)
    """Told once, when it ends: why ("stop", "length", "abort", or "error" for a failure),
    after its metrics have their end time (the engine's metrics)."""
    _send: MemoryObjectSendStream[StreamItem] = field(init=False, repr=False)
    receive: MemoryObjectReceiveStream[StreamItem] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._send, self.receive = anyio.create_memory_object_stream[StreamItem](math.inf)
        # A stream dropped before its iteration started (or ended) never closes its queue:
        # closed when the request goes, not left to warn (ResourceWarning) as garbage.
        weakref.finalize(self, _close_both, self._send, self.receive)
        if self.params.prompt_logprobs is not None:
            # The first token has no context: nothing predicts it.
            self.prompt_logprobs.append(None)
            self.prompt_top_logprobs.append(None)

    def close_unsubmitted(self) -> None:
        """Its stream ended before it was submitted (its prompt refused, its consumer gone,
        the engine stopped): nothing will use its queue."""
        self._send.close()
        self.receive.close()

    def take_prompt(self, prompt: PreparedPrompt) -> None:
        """Take the parts of its long prompt, prepared off the event loop."""
        self.prompt_ids = prompt.ids
        self.max_new_tokens = prompt.max_new_tokens
        self.output = prompt.output
        self.block_hashes = prompt.block_hashes
        self.unprepared_prompt = None

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + generated output."""
        # Slices only: a decode asks for one token, and copying the whole context every step
        # would cost time that grows with it, on the event loop.
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return tuple(self.prompt_ids[start:end])
        if start >= prompt:
            return tuple(self.token_ids[start - prompt : end - prompt])
        return (*self.prompt_ids[start:], *self.token_ids[: end - prompt])

    def push_token(self, token_id: int) -> StopUpdate:
        """Account for a sampled token: move its grammar past it (GrammarViolationError if
        the grammar does not allow it), then its stop conditions and text."""
        complete = self.grammar is not None and self.grammar.advance(token_id)
        return self.output.push(token_id, complete)

    def token_mask(self, samples: bool) -> NDArray[np.int32] | None:
        """The tokens its grammar allows next, for a step that samples it; else None."""
        return self.grammar.next_mask() if samples and self.grammar is not None else None

    def start_sampling(self, start: int) -> SamplingSetup | None:
        """For a step of the request that starts at token `start`: on its first step (its
        first chunk, which starts past its prefix cache hit), record that hit as its
        metrics' cached_tokens and return what the sampling stage needs of it; None
        afterwards (a delta)."""
        if self.sampling_sent:
            return None
        self.sampling_sent = True
        self.metrics.cached_tokens = start
        # Penalties count the prompt's ids: a step that starts past a prefix cache hit does
        # not show the stage the cached ones, so they come along once. Prompt logprobs need
        # the token after each chunk.
        params = self.params
        wants_prompt = params.needs_history or params.prompt_logprobs is not None
        prompt = tuple(self.prompt_ids) if wants_prompt else None
        return SamplingSetup(
            params, len(self.prompt_ids), self.eos_token_ids, prompt, self.bad_words_ids
        )

    def score_rows(self, start: int, end: int) -> range:
        """Rows of its step over positions [start, end) that score prompt tokens not scored
        yet (the row of position p predicts token p + 1): after a preemption, its recompute
        scores nothing twice."""
        if self.params.prompt_logprobs is None:
            return range(0)
        first = max(start, len(self.prompt_logprobs) - 1)
        stop = min(end, len(self.prompt_ids) - 1)
        return range(first - start, max(first, stop) - start)

    def add_prompt_scores(self, scores: PromptScores) -> None:
        """Record prompt logprobs a step computed; any it already has are skipped."""
        have = len(self.prompt_logprobs)
        if scores.first > have:
            raise RuntimeError(
                f"request {self.request_id!r}: prompt logprobs from token {scores.first}, but "
                f"only the first {have} are known"
            )
        skip = have - scores.first
        self.prompt_logprobs.extend(scores.logprobs[skip:])
        self.prompt_top_logprobs.extend(scores.top_logprobs[skip:])

    def prompt_logprobs_once(
        self,
    ) -> tuple[tuple[float | None, ...] | None, tuple[tuple[TokenLogprob, ...] | None, ...] | None]:
        """Its prompt logprobs for its first token's event (after `metrics.record_token`);
        (None, None) for later events and requests that did not ask."""
        if self.params.prompt_logprobs is None or self.metrics.num_output_tokens != 1:
            return None, None
        return tuple(self.prompt_logprobs), tuple(self.prompt_top_logprobs)

    def new_block_hashes(self) -> tuple[bytes, ...]:
        """Digests of the blocks its sampled tokens have filled since the last call (appended
        to `block_hashes`): its output is cached like its prompt, for a conversation's next
        turn and for its own recompute after a preemption."""
        size = self.hash_block_size
        hashed = len(self.block_hashes) * size
        known = len(self.prompt_ids) + len(self.token_ids)
        if not size or known - hashed < size:
            return ()
        parent = self.block_hashes[-1] if self.block_hashes else self.hash_root
        digests = block_hashes(self.tokens(hashed, known - known % size), size, parent)
        self.block_hashes += digests
        return digests

    def emit(self, event: TokenEvent) -> None:
        assert event.token_id is not None, "a sampled token's event"
        self.token_ids.append(event.token_id)
        self.logprobs.append(event.logprob)
        if event.top_logprobs is not None:
            self.top_logprobs.append(event.top_logprobs)
        self.text_parts.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        self._send_item(event)
        if event.finish_reason is not None:
            self._send.close()
            self._ended(event.finish_reason)

    def abort(self, now: float) -> None:
        """End the stream at time `now` with a last event of finish_reason "abort", no token,
        and the text held back so far (a consumer that left gets nothing: nobody reads its
        stream any more)."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.metrics.finished_time = now
            text = self.output.release_held() if self.token_ids else ""
            self.text_parts.append(text)
            self._send_item(TokenEvent(self.request_id, None, text, "abort", metrics=self.metrics))
            self._ended("abort")
        self._send.close()

    def fail(self, error: BaseException, now: float) -> None:
        """End the stream with `error` (raised in the consumer) at time `now`."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.metrics.finished_time = now
            self._ended("error")
        self._send_item(error)
        self._send.close()

    def _ended(self, reason: str) -> None:
        if self.on_end is not None:
            self.on_end(self, reason)

    def _send_item(self, item: StreamItem) -> None:
        # The consumer may have gone away (it aborted): then there is nobody to tell.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(item)

    @property
    def holds_id(self) -> bool:
        """Whether its request id is taken: until it finishes, fails, is aborted or its
        consumer leaves."""
        return self.finish_reason is None and not (self.abandoned or self.aborting)

    def completion(self) -> Completion:
        """What `Engine.generate` returns, once its stream has ended."""
        wants_logprobs = self.params.logprobs is not None
        scores_prompt = self.params.prompt_logprobs is not None
        return Completion(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            token_ids=list(self.token_ids),
            text=self.text,
            finish_reason=self.finish_reason or "abort",
            metrics=self.metrics,
            logprobs=list(self.logprobs) if wants_logprobs else None,
            top_logprobs=list(self.top_logprobs) if wants_logprobs else None,
            prompt_logprobs=list(self.prompt_logprobs) if scores_prompt else None,
            prompt_top_logprobs=list(self.prompt_top_logprobs) if scores_prompt else None,
        )

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def _close_both(
    send: MemoryObjectSendStream[StreamItem], receive: MemoryObjectReceiveStream[StreamItem]
) -> None:
    send.close()
    receive.close()
