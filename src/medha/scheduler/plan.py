"""BatchPlan: what one iteration must compute, as plain data the engine and simulator can read.

Positions are global token positions in the request's sequence (prompt then sampled tokens).
Block ids are deltas: a plan lists only the blocks allocated for this step; the engine appends
them to its own block table for (request, group) and drops that table when the request shows up
in `preempted` or `released`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from medha.scheduler.cost import SeqShape, head_only

SAMPLING_GROUP = 0
"""The KVP group whose last stage runs the LM head and samples for every sequence of a step (the
engine keeps each request's sampling state there). A sequence that runs only on other groups
sends it its final hidden rows, so its LM-head rows are priced on this group."""


class SeqKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class KvShard(NamedTuple):
    """The part of a sequence's KV cache one KVP group holds BEFORE the step: positions
    [start, end). The group that appends the step's new KV holds [start, query start)."""

    group: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


class ScheduledSeq(NamedTuple):
    """One sequence's share of a batch: query tokens [start, end) attend to everything before.

    A NamedTuple rather than a frozen dataclass: a plan holds hundreds of these and is built
    every iteration, and tuples are several times cheaper to create."""

    request_id: str
    kind: SeqKind
    start: int
    end: int
    shards: tuple[KvShard, ...]
    """Every active KVP group, in token order; the last one appends the new KV."""
    new_blocks: tuple[tuple[int, tuple[int, ...]], ...]
    """(group, block ids) allocated for this step: the whole reservation when a prefill starts,
    one block when a decode crosses a block boundary, else empty."""
    samples: bool
    """True when this step ends at the last known token, so the last stage samples a token."""
    head_rows: int = 1
    """Rows the LM head turns into logits (SeqShape.head_rows): one, or, for a request that
    scores its prompt, each prompt row it has not scored yet (`lm_head_rows`)."""

    @property
    def q_tokens(self) -> int:
        return self.end - self.start

    @property
    def kv_tokens(self) -> int:
        """Tokens already cached (on all groups together) that the queries attend to."""
        return self.start

    @property
    def append_group(self) -> int:
        return self.shards[-1].group

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(shard.group for shard in self.shards)


def lm_head_rows(scored: range, start: int, end: int) -> int:
    """Rows of a step over positions [start, end) that the LM head runs on: the prompt positions
    in `scored` whose rows it scores (prompt_logprobs), or the one row every sequence is charged
    (medha.perf.cost_model: whether it samples or not)."""
    return max(1, min(end, scored.stop) - max(start, scored.start))


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One micro-batch. Decodes come first, then prefill chunks in priority order."""

    plan_id: int
    created_at: float
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()
    """Requests evicted while building this plan: drop their KV, they will recompute."""
    released: tuple[str, ...] = ()
    """Requests that finished or were aborted since the previous plan: drop their KV."""
    predicted_time: float = 0.0
    """Predicted seconds for the batch to traverse the model (slowest KVP group)."""
    predicted_stage_time: float = 0.0
    """Predicted seconds the batch occupies one pipeline stage (slowest KVP group)."""

    @property
    def is_empty(self) -> bool:
        """An empty plan is not in flight: there is nothing to run (housekeeping fields may
        still list requests whose KV the engine should drop)."""
        return not self.seqs

    @property
    def num_decodes(self) -> int:
        return sum(1 for seq in self.seqs if seq.kind is SeqKind.DECODE)

    @property
    def prefills(self) -> tuple[ScheduledSeq, ...]:
        return tuple(seq for seq in self.seqs if seq.kind is SeqKind.PREFILL)

    @property
    def num_tokens(self) -> int:
        return sum(seq.q_tokens for seq in self.seqs)

    def group_shapes(self) -> dict[int, list[SeqShape]]:
        """What each KVP group runs: every sequence with KV on it, priced at that group's
        shard, and the LM-head rows of every sequence on the sampling group (the scheduler's
        own view when it priced the plan)."""
        by_group: dict[int, list[SeqShape]] = {}
        for seq in self.seqs:
            groups = len(seq.shards)
            sampled_here = False
            for shard in seq.shards:
                sampler = shard.group == SAMPLING_GROUP
                sampled_here |= sampler
                rows = seq.head_rows if sampler else 0
                shape = SeqShape(seq.q_tokens, shard.tokens, groups, rows)
                by_group.setdefault(shard.group, []).append(shape)
            if not sampled_here:
                by_group.setdefault(SAMPLING_GROUP, []).append(head_only(seq.head_rows))
        return by_group
