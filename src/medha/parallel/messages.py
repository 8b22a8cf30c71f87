"""Messages from the scheduler actor to the worker processes: one ShardStep per KVP group per
step, carrying deltas only (the step's query tokens, this group's new blocks, this group's part of
each sequence's KV). Results come back as medha.actors.messages.StepOutput.

A KVP group runs only the sequences with KV on it (DESIGN section 8): a short request lives on one
group, so the groups are data-parallel replicas for short traffic, while a long request's step
runs on each group holding part of its KV, their attention partials merged. The sampling group
(RankLayout.sampler_rank's) is sent every sequence of the step, run there or not: it samples
them all, from final hidden states the group that ran one sends it.

Small frozen dataclasses: they are pickled by torch.distributed.rpc for every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medha.actors.messages import SeqWork
from medha.parallel.layout import RankLayout


@dataclass(frozen=True, slots=True)
class ShardWork(SeqWork):
    """A sequence's step as one KVP group sees it: the single-process SeqWork (new tokens, this
    group's new blocks, sampling on the first step) plus the group's part of the KV."""

    kv_start: int | None = None
    """First position of the request's KV this group holds; None: it holds none of it."""
    kv_end: int = 0
    """End of that range before the step (ignored when `appends`)."""
    appends: bool = False
    """This group is the request's last: it stores the step's new KV and attends causally."""
    runs: bool = True
    """This group runs the step of the sequence. False: it only takes the new blocks (reserved
    for a later part of the prompt) or, on the sampling group, samples from rows sent to it."""
    merge_offset: int | None = None
    """First row of the sequence in the step's merge buffer (ShardStep.merge_rows): its step
    runs on several groups, whose attention partials are merged. None: it runs on one group."""
    reporter: int | None = None
    """On the sampling group and on the group named: the group that sends the sequence's final
    hidden rows (`head_rows`) to the sampling group, which does not run it. None where the
    sampling group runs it."""


@dataclass(frozen=True, slots=True)
class ShardStep:
    seq_no: int
    """Every message to the workers is numbered; each worker runs them in this order."""
    step_id: int
    """The plan id (-1 for housekeeping only)."""
    seqs: tuple[ShardWork, ...]
    release: tuple[str, ...] = ()
    preempted: tuple[str, ...] = ()
    all_logits: bool = False
    """Return the logits of every query token (exactness tests), not only sampling rows."""
    return_logits: bool = False
    """Send the logits back with the sampled tokens (exactness tests)."""
    merge_rows: int = 0
    """Rows of the step's merge buffer: the query tokens of every sequence that runs on several
    KVP groups, the same on every group (each group's all-gather of attention partials covers
    these rows only, and none is made when there are none)."""


@dataclass(frozen=True, slots=True)
class StageDone:
    """What one worker reports for a step: when it finished its stage, and on the sampling rank
    the step's output (and logits when asked for)."""

    seq_no: int
    rank: int
    output: object | None = None
    """A medha.actors.messages.StepOutput from the sampling rank, else None."""
    logits: object | None = None
    seconds: float = 0.0
    """How long this rank computed the step: from holding its inputs (the previous stage's
    hidden states received) to its output, collectives with its TP and KVP peers included."""


def head_rows(work: ShardWork, all_logits: bool) -> list[int]:
    """Rows of `work`'s step (0 = its first query token) the sampling group's LM head reads:
    the one that samples and those that score the prompt, or every row with `all_logits`."""
    count = len(work.token_ids)
    if all_logits:
        return list(range(count))
    rows = list(work.score_rows)
    if work.samples and (not rows or rows[-1] != count - 1):
        rows.append(count - 1)
    return rows


def step_for_rank(steps: list[ShardStep], layout: RankLayout, rank: int) -> ShardStep:
    """What `rank` is sent of a step whose KVP group g gets `steps[g]`: its group's, less the
    token masks of structured outputs unless it is the rank that samples (each mask is one bit
    per token of the vocabulary, per request: no other rank reads them)."""
    step = steps[layout.coords(rank).kvp]
    if rank == layout.sampler_rank or all(work.token_mask is None for work in step.seqs):
        return step
    return replace(step, seqs=tuple(replace(work, token_mask=None) for work in step.seqs))
