"""KVP placement: token ranges per group, onboarding, active groups, first-group choice, and
where each group's work is priced."""

from __future__ import annotations

import pytest

from medha.scheduler import KvShard, Scheduler, SeqKind, SeqShape
from medha.scheduler.cost import head_only
from tests.scheduler_support import Arrival, ToyCost, drive, make_scheduler, step

M = 4096


def _kvp_scheduler(**overrides: object) -> Scheduler:
    settings: dict[str, object] = {
        "kvp_groups": 4,
        "max_tokens_per_kvp_group": M,
        "num_blocks": 1024,
        "target_batch_time": 0.05,
    }
    settings.update(overrides)
    return make_scheduler(None, **settings)


def test_a_long_prompt_fills_its_groups_in_order_and_chunks_stop_at_each_boundary() -> None:
    scheduler = _kvp_scheduler()
    result = drive(scheduler, [Arrival("long", 0.0, 3 * M + 100, 2)])
    chunks = result.chunks_of("long")
    starts_of_groups = [start for start, _ in chunks if start % M == 0]
    assert starts_of_groups == [0, M, 2 * M, 3 * M]  # each group onboards with a fresh chunk
    for start, end in chunks:
        assert start // M == (end - 1) // M


def test_every_group_holding_kv_is_active_and_the_last_one_appends() -> None:
    scheduler = _kvp_scheduler()
    scheduler.add_request("long", 2 * M + 500, 3, arrival=0.0)
    plans = []
    now = 0.0
    while scheduler.get("long") is not None:
        plan, _ = step(scheduler, now)
        plans.append(plan)
        now += plan.predicted_time
    first_group = plans[0].seqs[0].append_group
    groups = [first_group, (first_group + 1) % 4, (first_group + 2) % 4]
    onboarding = next(p.seqs[0] for p in plans if p.seqs[0].start == M)
    assert onboarding.shards == (KvShard(groups[0], 0, M), KvShard(groups[1], M, M))
    last_prefill = next(p.seqs[0] for p in plans if p.seqs[0].samples)
    assert last_prefill.groups == tuple(groups)
    decode = plans[-1].seqs[0]
    assert decode.kind is SeqKind.DECODE
    assert decode.shards[:2] == (KvShard(groups[0], 0, M), KvShard(groups[1], M, 2 * M))
    assert decode.append_group == groups[2]


def test_a_decode_crossing_m_onboards_the_next_group_with_a_new_block() -> None:
    scheduler = _kvp_scheduler(kvp_groups=2)
    scheduler.add_request("r", M - 2, 10, arrival=0.0)
    now = 0.0
    onboarded = None
    while scheduler.get("r") is not None:
        plan, _ = step(scheduler, now)
        now += 0.01
        seq = plan.seqs[0]
        if seq.kind is SeqKind.DECODE and seq.start == M:
            onboarded = seq
    assert onboarded is not None
    first = onboarded.shards[0].group
    assert onboarded.shards == (KvShard(first, 0, M), KvShard(1 - first, M, M))
    assert onboarded.new_blocks == ((1 - first, onboarded.new_blocks[0][1]),)
    assert len(onboarded.new_blocks[0][1]) == 1


def test_a_new_request_goes_to_the_group_with_the_least_pending_work() -> None:
    scheduler = make_scheduler(kvp_groups=2, num_blocks=4096, target_batch_time=0.05)
    scheduler.add_request("long", 50_000, 2, arrival=0.0)
    plan, _ = step(scheduler, 0.0)
    long_group = plan.seqs[0].append_group
    scheduler.add_request("short", 500, 2, arrival=0.1)
    plan, _ = step(scheduler, 0.1)
    placed = {seq.request_id: seq.append_group for seq in plan.seqs}
    assert placed["short"] == 1 - long_group


def test_groups_serve_short_requests_in_parallel_each_with_its_own_budget() -> None:
    one = make_scheduler(kvp_groups=1, target_batch_time=0.05)
    two = make_scheduler(kvp_groups=2, target_batch_time=0.05)
    for scheduler in (one, two):
        for index in range(2):
            scheduler.add_request(f"r{index}", 2000, 2, arrival=0.0)
    plan_one, _ = step(one, 0.0)
    plan_two, _ = step(two, 0.0)
    assert sum(seq.q_tokens for seq in plan_one.prefills) < 4000
    assert sorted(seq.q_tokens for seq in plan_two.prefills) == [2000, 2000]
    assert {seq.append_group for seq in plan_two.prefills} == {0, 1}


def test_kvp_workloads_release_every_block_on_every_group() -> None:
    scheduler = _kvp_scheduler(num_blocks=600)
    arrivals = [
        Arrival(f"r{i}", 0.03 * i, [500, M + 7, 2 * M + 300, 3 * M - 1][i % 4], 20 + i)
        for i in range(16)
    ]
    result = drive(scheduler, arrivals)
    assert len(result.finished) == 16


def test_a_chunk_that_only_reaches_a_kvp_boundary_gets_no_finishing_allowance() -> None:
    # 2400 fresh tokens take ~53 ms on ToyCost: within the finishing allowance (1.25 x 50 ms)
    # but over the ordinary +10%. As a whole prompt they are one chunk; as the first shard of a
    # longer prompt they are not, for the prompt does not finish there.
    whole = drive(_kvp_scheduler(max_tokens_per_kvp_group=2400), [Arrival("r", 0.0, 2400, 2)])
    assert whole.chunks_of("r") == [(0, 2400)]
    longer = drive(_kvp_scheduler(max_tokens_per_kvp_group=2400), [Arrival("r", 0.0, 4800, 2)])
    first_shard = [(s, e) for s, e in longer.chunks_of("r") if e <= 2400]
    assert len(first_shard) == 2 and first_shard[-1][1] == 2400


def test_the_sampling_group_is_priced_the_lm_head_rows_of_every_group() -> None:
    # Group 0's last stage runs the LM head for every sequence of a step (plan.SAMPLING_GROUP);
    # a group that ran a sequence only sends it the final hidden rows. So group 1's decode
    # costs group 1 its layers and group 0 its head row.
    cost = ToyCost(per_head_row=1e-3)
    scheduler = make_scheduler(cost, kvp_groups=2, num_blocks=4096)
    for index in range(2):
        scheduler.add_request(f"r{index}", 200, 3, arrival=0.0)
    prefills, _ = step(scheduler, 0.0)
    assert {seq.append_group for seq in prefills.seqs} == {0, 1}
    decodes, _ = step(scheduler, 0.1)
    context = {seq.request_id: seq.start for seq in decodes.seqs}
    on_group = {seq.append_group: seq.request_id for seq in decodes.seqs}
    own, other = context[on_group[0]], context[on_group[1]]
    shapes = decodes.group_shapes()
    assert shapes[1] == [SeqShape(1, other, 1, 0)]
    assert sorted(shapes[0]) == sorted([SeqShape(1, own, 1, 1), head_only(1)])
    assert decodes.predicted_time == pytest.approx(
        cost.batch_time([SeqShape(1, own, 1, 1), SeqShape(0, 0, 1, 1)])
    )
    assert decodes.predicted_time > cost.batch_time(shapes[1]) + 1.5e-3


def test_a_sampling_group_without_sequences_of_its_own_still_runs_the_lm_head() -> None:
    # The request on group 0 ends with its prefill; the other's decodes run on group 1 alone,
    # but their head rows on group 0, which a costly head makes the slower group.
    cost = ToyCost(per_head_row=1e-3)
    scheduler = make_scheduler(cost, kvp_groups=2, num_blocks=4096, pp_stages=2, spp=True)
    scheduler.add_request("ends", 200, 1, arrival=0.0)
    scheduler.add_request("decodes", 200, 3, arrival=0.0)
    prefills, _ = step(scheduler, 0.0)
    assert {seq.request_id: seq.append_group for seq in prefills.seqs}["ends"] == 0
    decode, _ = step(scheduler, 0.1)
    assert decode.group_shapes() == {1: [SeqShape(1, 200, 1, 0)], 0: [head_only(1)]}
    assert decode.predicted_time == pytest.approx(cost.batch_time([head_only(1)]))
    assert decode.predicted_stage_time == pytest.approx(cost.stage_time([head_only(1)]))


def _chunks_beside_a_long_prefill(
    policy: str, *others: tuple[str, int, bool], per_head_row: float = 2e-5
) -> tuple[dict[str, int], float]:
    """The tokens each request prefills in the first plan, and its predicted time: a long
    prompt ranked first takes group 0 (its chunk fills the budget, or with fcfs its whole
    prompt far over it), and `others` (id, prompt tokens, scored), ranked in that order after
    it, go to group 1."""
    cost = ToyCost(per_head_row=per_head_row)
    scheduler = make_scheduler(
        cost, policy=policy, kvp_groups=2, num_blocks=8192, target_batch_time=0.05
    )
    scheduler.add_request("long", 20_000, 2, arrival=0.0, deadline=1.0)
    for rank, (request_id, prompt, scored) in enumerate(others):
        scheduler.add_request(
            request_id, prompt, 2, arrival=0.0, deadline=10.0 + rank, scores_prompt=scored
        )
    plan, _ = step(scheduler, 0.0)
    assert {seq.request_id: seq.append_group for seq in plan.seqs}["long"] == 0
    assert all(seq.append_group == 1 for seq in plan.seqs if seq.request_id != "long")
    tokens = {request_id: 0 for request_id, _, _ in others}
    for seq in plan.seqs:
        tokens[seq.request_id] = seq.q_tokens
    assert tokens["long"] > 1500 if policy == "edf" else tokens["long"] == 20_000
    return tokens, plan.predicted_time


def test_a_full_sampling_group_bounds_only_the_chunks_whose_head_rows_grow_with_them() -> None:
    # A chunk on group 1 adds one row to group 0's head, whatever its size: a full group 0
    # (even far over its budget, with fcfs) does not close group 1 to prefills.
    for policy in ("edf", "fcfs"):
        plain, _ = _chunks_beside_a_long_prefill(policy, ("plain", 1500, False))
        assert plain["plain"] == 1500
    # A scored prompt's chunk adds a row per token, so it is sized to what is left of group
    # 0's budget, as a chunk of its own there would be.
    scored, predicted = _chunks_beside_a_long_prefill("edf", ("scored", 1500, True))
    assert 0 < scored["scored"] <= 64
    assert predicted <= 0.05 * 1.1
    # Group 1 itself is nearly idle then: the next prompt there still gets a budget's chunk.
    both, predicted = _chunks_beside_a_long_prefill(
        "edf", ("scored", 3000, True), ("next", 5000, False)
    )
    assert 0 < both["scored"] <= 64 and both["next"] > 1500
    assert predicted <= 0.05 * 1.1
    # A head so costly that not one scored row fits group 0: the scored prompt waits, and
    # group 1 stays open to the next prompt (it is group 0's budget that is spent).
    waits, predicted = _chunks_beside_a_long_prefill(
        "edf", ("scored", 3000, True), ("next", 5000, False), per_head_row=2e-4
    )
    assert waits["scored"] == 0 and waits["next"] > 1500
    assert predicted <= 0.05 * 1.1
