"""SchedRequest: the scheduler's view of one request (lengths, cursors, deadline, KV placement).

A request is a sequence of known tokens (prompt, then sampled tokens). Its KV cache catches up
with the known tokens step by step (the vLLM v1 "computed tokens" model): a prefill chunk moves
the cursors by many tokens, a decode by one, and a step whose end reaches the last known token
samples the next token. Three cursors track one step's journey through the pipeline:
issued (entered stage 0) >= stage0 (left stage 0) >= computed (left the last stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from medha.errors import InvalidRequestError
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import BatchCostModel, SeqShape


class RequestStatus(Enum):
    """Where a request is in its life; FINISHED and ABORTED are terminal."""

    WAITING = "waiting"
    """Queued, never started: holds no KV blocks."""
    PREEMPTED = "preempted"
    """Evicted to free memory: holds no KV blocks, waits to recompute its prefill."""
    PREFILLING = "prefilling"
    """Started: KV blocks for the whole prefill are reserved, chunks are being computed."""
    DECODING = "decoding"
    """Prefill done: generates one token per step."""
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def is_queued(self) -> bool:
        return self in (RequestStatus.WAITING, RequestStatus.PREEMPTED)

    @property
    def is_running(self) -> bool:
        return self in (RequestStatus.PREFILLING, RequestStatus.DECODING)

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


@dataclass(eq=False, slots=True)
class SchedRequest:
    """One request as the scheduler tracks it. Mutated only by the Scheduler."""

    request_id: str
    arrival: float
    prompt_len: int
    max_new_tokens: int
    deadline: float
    """d_i: seconds after arrival by which the first token is due."""
    deadline_given: bool
    """True when the caller chose the deadline, False for the default rule."""
    total_prefill_s: float
    """w_total: predicted seconds to prefill the prompt alone on an idle replica."""
    order: int
    """Arrival order, breaks every priority tie so that schedules are deterministic."""

    status: RequestStatus = RequestStatus.WAITING
    generated: int = 0
    """Tokens sampled so far."""
    prefill_len: int = 0
    """Tokens the current prefill covers: the prompt, or prompt + generated after a preemption."""
    issued: int = 0
    stage0: int = 0
    computed: int = 0
    in_flight: int = 0
    """Plans in flight that contain a step of this request."""
    groups: tuple[int, ...] = ()
    """KVP groups holding this request's KV, in token order (group i holds [i*M, (i+1)*M))."""
    block_tables: tuple[list[int], ...] = ()
    """Block ids per entry of `groups`. Both are tuples, empty until the request is placed:
    the empty tuple is shared, so the ~1,000 queued requests of a busy scheduler hold no
    containers of their own for the garbage collector to track and traverse."""
    block_hashes: tuple[bytes, ...] = ()
    """Chained digests of its full blocks (medha.scheduler.prefix_cache), for prefix caching:
    the prompt's, then those its sampled tokens fill (`extend_block_hashes`); empty: the
    request neither uses nor fills the cache (so far)."""
    scores_prompt: bool = False
    """It scores its prompt (SamplingParams.prompt_logprobs): it takes no block from the prefix
    cache (it computes its whole prompt, though it fills the cache like any other), and its
    prefill runs the LM head on every prompt row (ScheduledSeq.head_rows), which its work
    counts."""
    scored_to: int = 0
    """Prompt positions before this one are scored already: after a preemption, its recompute
    runs them without the LM head (the engine scores nothing twice)."""
    cached_at_arrival: int = 0
    """Prompt tokens the prefix cache held when it arrived: `total_prefill_s` (its priority
    and default deadline) counts only the rest."""
    registered_blocks: int = 0
    """Leading blocks already in the prefix cache (taken from it, or registered once
    computed)."""
    start_order: int = -1
    """When it was (re)started: decodes are evicted newest first."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    _remaining_cache_at: int = -1
    _remaining_cache_s: float = 0.0
    # Priority key cache (see PriorityPolicy.ranked): key(t) = key_base - key_rate * t, valid
    # while the cursor and the known tokens are those it was computed at.
    key_cursor: int = -1
    key_known: int = -1
    key_base: float = 0.0
    key_rate: float = 0.0

    @property
    def known_tokens(self) -> int:
        """Prompt plus sampled tokens: what the KV cache must eventually hold."""
        return self.prompt_len + self.generated

    @property
    def reads_cache(self) -> bool:
        """Whether it may take computed blocks from the prefix cache."""
        return not self.scores_prompt

    @property
    def scored_positions(self) -> range:
        """Prompt positions whose rows its prefill still scores (none unless `scores_prompt`)."""
        return range(self.scored_to, self.prompt_len) if self.scores_prompt else range(0)

    @property
    def tokens_left(self) -> int:
        """Known tokens whose step has not been issued yet."""
        return self.known_tokens - self.issued

    @property
    def deadline_at(self) -> float:
        """Absolute time by which the first token is due."""
        return self.arrival + self.deadline

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival

    @property
    def met_deadline(self) -> bool | None:
        """Whether the first token came in time (None until it came)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time <= self.deadline_at

    def remaining_prefill_s(self, cost: BatchCostModel, cursor: int | None = None) -> float:
        """w_i(t): predicted seconds of prefill work not issued yet (0 once decoding); with
        `cursor`, the work from that prompt position on (the work a plan in flight still
        counted when it was made).

        Cached per cursor position: priorities and placement ask for it every iteration, and
        it only changes when the cursor moves, a preemption resets it, or the cost model's
        prefill level moves (`reprice`).
        """
        if self.status is RequestStatus.DECODING or self.status.is_done:
            return 0.0
        # total_prefill_s is the work from token 0 unless it counted a prefix cache hit, which
        # holds only while the request waits (placed, it may have found none).
        whole = not self.cached_at_arrival or self.status.is_queued
        if cursor is not None and cursor != self.issued:
            if cursor == 0 and self.known_tokens == self.prompt_len and not self.cached_at_arrival:
                return self.total_prefill_s
            return remaining_work(cost, cursor, self.known_tokens, self.scored_positions)
        if self._remaining_cache_at != self.issued:
            total = self.known_tokens
            if self.issued == 0 and total == self.prompt_len and whole:
                self._remaining_cache_s = self.total_prefill_s
            else:
                self._remaining_cache_s = remaining_work(
                    cost, self.issued, total, self.scored_positions
                )
            self._remaining_cache_at = self.issued
        return self._remaining_cache_s

    def reprice(self, cost: BatchCostModel) -> None:
        """The cost model's prefill level moved: re-predict the whole prefill and drop the
        cached remaining work and priority key (the scheduler decides about the deadline)."""
        self.total_prefill_s = prefill_work(
            cost, self.cached_at_arrival, self.prompt_len, self.scores_prompt
        )
        self._remaining_cache_at = -1
        self.key_cursor = -1

    def reset_progress(self) -> None:
        """Forget all KV progress (after a preemption): the prefill restarts from token 0."""
        if self.scores_prompt:
            self.scored_to = max(self.scored_to, min(self.computed, self.prompt_len))
        self.issued = self.stage0 = self.computed = 0
        self.prefill_len = 0
        self.registered_blocks = 0
        self.groups = ()
        self.block_tables = ()
        self._remaining_cache_at = -1
        self.key_cursor = -1


def prefill_work(
    cost: BatchCostModel, cached: int, prompt_len: int, scores_prompt: bool = False
) -> float:
    """w_total: predicted seconds to prefill a prompt alone, past `cached` tokens the prefix
    cache holds (`scores_prompt`: scoring each of its rows, see SchedRequest.scores_prompt)."""
    scored = range(prompt_len) if scores_prompt else range(0)
    if cached:
        return remaining_work(cost, cached, prompt_len, scored)
    return cost.prefill_time(prompt_len) + scoring_work(cost, len(scored))


def remaining_work(
    cost: BatchCostModel, processed: int, total: int, scored: range = range(0)
) -> float:
    """Predicted seconds to prefill positions [processed, total) alone, the rows of those in
    `scored` through the LM head."""
    rows = len(range(max(processed, scored.start), min(total, scored.stop)))
    return cost.remaining_prefill_time(processed, total) + scoring_work(cost, rows)


def scoring_work(cost: BatchCostModel, rows: int) -> float:
    """Predicted seconds the LM head adds to a prefill for scoring `rows` of its rows: those
    rows priced in one batch with and without the head on each. A prompt scored in chunks
    pays about that much where the head's matmul is compute-bound in chunks (on a CPU at any
    size; on a GPU from a few hundred rows), somewhat less below."""
    if rows <= 0:
        return 0.0
    scored = cost.batch_time((SeqShape(rows, 0, 1, rows),))
    return max(0.0, scored - cost.batch_time((SeqShape(rows, 0),)))


def check_request_fields(
    request_id: str,
    prompt_len: int,
    max_new_tokens: int,
    arrival: float,
    deadline: float | None,
    block_hashes: Sequence[bytes],
    config: SchedulerConfig,
) -> None:
    """Raise InvalidRequestError for lengths, times or digests a request cannot have."""
    if prompt_len < 1 or max_new_tokens < 1:
        raise InvalidRequestError(
            f"request {request_id!r}: prompt_len ({prompt_len}) and max_new_tokens "
            f"({max_new_tokens}) must both be at least 1"
        )
    if deadline is not None and not 0 < deadline < math.inf:
        # An infinite deadline would make LARS's key NaN (inf / inf), and NaN keys sort
        # other requests wrongly: "no deadline" is None (the default rule).
        raise InvalidRequestError(
            f"request {request_id!r}: deadline must be a finite number of seconds > 0, "
            f"got {deadline}"
        )
    if not math.isfinite(arrival):
        raise InvalidRequestError(f"request {request_id!r}: arrival must be finite")
    if len(block_hashes) > prompt_len // config.block_size:
        raise InvalidRequestError(
            f"request {request_id!r}: {len(block_hashes)} block hashes for a prompt of "
            f"{prompt_len} tokens ({prompt_len // config.block_size} full blocks)"
        )


def extend_block_hashes(request: SchedRequest, digests: Sequence[bytes], block_size: int) -> None:
    """Append the digests of `request`'s next full blocks; InvalidRequestError for more than
    its known tokens fill."""
    full = request.known_tokens // block_size
    if len(request.block_hashes) + len(digests) > full:
        raise InvalidRequestError(
            f"request {request.request_id!r}: {len(request.block_hashes) + len(digests)} block "
            f"hashes for {request.known_tokens} known tokens ({full} full blocks)"
        )
    # A tuple, rebuilt: a few microseconds per block of output, and queued requests keep
    # sharing the empty one (see `block_tables`).
    request.block_hashes += tuple(digests)
