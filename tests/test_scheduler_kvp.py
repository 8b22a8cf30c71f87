"""KVP placement: token ranges per group, onboarding, active groups, first-group choice."""

from __future__ import annotations

from medha.scheduler import KvShard, Scheduler, SeqKind
from tests.scheduler_support import Arrival, drive, make_scheduler, step

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
