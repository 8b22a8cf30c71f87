"""Which KVP group runs what of a step: one sequence's ShardWork for each group.

A sequence's step runs on the groups holding part of its KV (its shards), and only there, as the
scheduler priced it (BatchPlan.group_shapes). A request whose KV fits one group (every short
request) therefore runs on its group alone, and the groups serve short traffic side by side, as
data-parallel replicas; a long request's step runs on each of its groups and their attention
partials are merged (medha.parallel.kvp.KvpMerge). Besides the groups that run it, a sequence
goes to:
- a group whose new blocks the step carries, not yet holding its KV (a prompt's reservation
  covers every group the prefill will reach): to keep the blocks;
- the sampling group (0, RankLayout.sampler_rank's), always: it keeps every request's
  sampling state and samples every token, from the final hidden rows the group that ran the
  sequence (its appending group) sends it.
"""

from __future__ import annotations

from medha.parallel.layout import SAMPLING_GROUP
from medha.parallel.messages import ShardWork
from medha.sampling import SamplingSetup
from medha.scheduler.plan import ScheduledSeq


def seq_works(
    seq: ScheduledSeq,
    kvp: int,
    *,
    tokens: tuple[int, ...],
    sampling: SamplingSetup | None,
    score_rows: range,
    token_mask: object,
    merge_offset: int | None,
) -> list[ShardWork | None]:
    """Group g's ShardWork of `seq`'s step, or None where group g has nothing to do with it.
    `merge_offset`: the sequence's first row in the step's merge buffer when it runs on several
    groups (None otherwise)."""
    blocks: dict[int, tuple[int, ...]] = {}
    for group, ids in seq.new_blocks:
        blocks[group] = blocks.get(group, ()) + tuple(ids)
    shards = {shard.group: shard for shard in seq.shards}
    if (len(shards) > 1) != (merge_offset is not None):
        raise ValueError("a sequence is merged exactly when it runs on several groups")
    appender = seq.append_group
    # The rows the sampling group's LM head reads come from the appending group when the
    # sampling group does not run the sequence itself.
    reporter = None if SAMPLING_GROUP in shards else appender
    works: list[ShardWork | None] = []
    for group in range(kvp):
        shard = shards.get(group)
        sampler = group == SAMPLING_GROUP
        if shard is None and not sampler and group not in blocks:
            works.append(None)
            continue
        # The sampling group samples and scores; the reporter sends it the rows that score.
        heads = sampler or group == reporter
        works.append(
            ShardWork(
                request_id=seq.request_id,
                start=seq.start,
                token_ids=tokens,
                new_blocks=blocks.get(group, ()),
                samples=seq.samples,
                # Only the sampling group keeps sampling state (a penalised request's copy
                # carries its prompt: no other group needs one).
                sampling=sampling if sampler else None,
                kv_start=None if shard is None else shard.start,
                kv_end=0 if shard is None else shard.end,
                appends=group == appender,
                score_rows=score_rows if heads else range(0),
                token_mask=token_mask if sampler else None,  # type: ignore[arg-type]
                runs=shard is not None,
                merge_offset=merge_offset if shard is not None else None,
                reporter=reporter if heads else None,
            )
        )
    return works
