"""What goes into one batch: decodes first, prefill chunks by policy, budgets and limits."""

from __future__ import annotations

import pytest

from medha.scheduler import Scheduler, SeqKind, SeqShape
from medha.scheduler.policies import relative_slack
from tests.scheduler_support import Arrival, ToyCost, drive, make_scheduler, step


def _decoding(
    scheduler_kwargs: dict[str, object], count: int, cost: ToyCost | None = None
) -> tuple[Scheduler, float]:
    """A scheduler with `count` requests already decoding, and the time it got there."""
    scheduler = make_scheduler(cost, **scheduler_kwargs)
    for index in range(count):
        scheduler.add_request(f"d{index}", 64, 1000, arrival=0.0)
    now = 0.0
    while scheduler.stats().decoding < count:
        step(scheduler, now)
        now += 0.01
    return scheduler, now


def test_every_running_decode_comes_first_then_prefill_chunks() -> None:
    scheduler, now = _decoding({"target_batch_time": 0.05}, count=3)
    scheduler.add_request("p", 30_000, 4, arrival=now)
    plan, _ = step(scheduler, now)
    kinds = [(seq.request_id, seq.kind) for seq in plan.seqs]
    assert kinds[:3] == [(f"d{i}", SeqKind.DECODE) for i in range(3)]
    assert kinds[3:] == [("p", SeqKind.PREFILL)]


def test_a_prefill_still_gets_the_minimum_chunk_when_decodes_alone_exceed_the_budget() -> None:
    heavy_decodes = ToyCost(per_kv_read=1e-4)  # every decode costs ~6 ms
    scheduler, now = _decoding({"target_batch_time": 0.02}, count=8, cost=heavy_decodes)
    scheduler.add_request("p1", 5000, 4, arrival=now)
    scheduler.add_request("p2", 5000, 4, arrival=now)
    plan, _ = step(scheduler, now)
    assert plan.num_decodes == 8
    assert [(seq.request_id, seq.q_tokens) for seq in plan.prefills] == [("p1", 32)]


def test_several_prefills_share_a_batch_while_the_budget_lasts() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)
    for index in range(5):
        scheduler.add_request(f"s{index}", 300, 4, arrival=0.0)
    plan, _ = step(scheduler, 0.0)
    assert [seq.q_tokens for seq in plan.prefills] == [300] * 5
    assert all(seq.samples for seq in plan.prefills)


def test_max_batch_size_caps_both_the_batch_and_the_running_requests() -> None:
    scheduler = make_scheduler(max_batch_size=3)
    arrivals = [Arrival(f"r{i}", 0.0, 50, 10) for i in range(10)]
    result = drive(scheduler, arrivals)  # drive() checks len(plan.seqs) <= max_batch_size
    assert len(result.finished) == 10
    assert max(len(plan.seqs) for plan in result.plans) == 3


def test_fcfs_prefills_a_started_prompt_whole_in_one_iteration() -> None:
    scheduler = make_scheduler(policy="fcfs", target_batch_time=0.02)
    scheduler.add_request("long", 50_000, 2, arrival=0.0)
    scheduler.add_request("short", 100, 2, arrival=0.1)
    plan, _ = step(scheduler, 0.1)
    assert [(seq.request_id, seq.start, seq.end) for seq in plan.seqs] == [("long", 0, 50_000)]
    assert plan.predicted_time > 1.0  # the convoy: nothing else runs for seconds


def test_fcfs_chunked_spends_a_fixed_token_budget_per_iteration() -> None:
    scheduler, now = _decoding({"policy": "fcfs-chunked", "fixed_chunk": 512}, count=4)
    scheduler.add_request("a", 600, 4, arrival=now)
    scheduler.add_request("b", 600, 4, arrival=now + 0.001)
    plan, _ = step(scheduler, now + 0.001)
    assert [(seq.request_id, seq.q_tokens) for seq in plan.prefills] == [("a", 508)]
    plan, _ = step(scheduler, now + 0.002)
    assert [(seq.request_id, seq.q_tokens) for seq in plan.prefills] == [("a", 92), ("b", 416)]


def test_adaptive_policies_give_the_most_urgent_prefill_the_largest_fitting_chunk() -> None:
    scheduler = make_scheduler(policy="edf", target_batch_time=0.05)
    scheduler.add_request("relaxed", 40_000, 2, arrival=0.0, deadline=60.0)
    scheduler.add_request("urgent", 40_000, 2, arrival=0.0, deadline=5.0)
    plan, _ = step(scheduler, 0.0)
    assert plan.prefills[0].request_id == "urgent"
    assert plan.prefills[0].q_tokens > 1000


def _long_prefill_in_progress(threshold: int, deadline: float) -> tuple[Scheduler, float]:
    """A scheduler running a 100K-token prompt that has just passed `threshold` tokens."""
    scheduler = make_scheduler(
        policy="lars", long_prefill_threshold=threshold, target_batch_time=0.05, num_blocks=20_000
    )
    scheduler.add_request("long", 100_000, 2, arrival=0.0, deadline=deadline)
    now = 0.0
    while scheduler.get("long").issued < threshold:  # type: ignore[union-attr]
        plan, _ = step(scheduler, now)
        now += plan.predicted_time
    return scheduler, now


def test_a_long_prefill_with_slack_leaves_part_of_the_budget_to_short_prefills() -> None:
    scheduler, now = _long_prefill_in_progress(threshold=16_384, deadline=60.0)
    long = scheduler.get("long")
    assert long is not None
    rho = relative_slack(long, now, scheduler.cost)
    assert rho > 0.5  # far ahead of schedule: it keeps half of the budget
    scheduler.add_request("short", 400, 2, arrival=now)
    plan, _ = step(scheduler, now)
    assert [seq.request_id for seq in plan.prefills] == ["long", "short"]
    long_chunk = plan.prefills[0]
    # The long chunk was sized against half the budget; the short one rides in the rest.
    long_alone = scheduler.cost.batch_time([SeqShape(long_chunk.q_tokens, long_chunk.start)])
    assert long_alone <= 0.05 * 0.5 * 1.1
    assert plan.predicted_time <= 0.05 * 1.1


def test_a_long_prefill_without_slack_takes_the_whole_budget() -> None:
    scheduler, now = _long_prefill_in_progress(threshold=16_384, deadline=1.0)
    scheduler.add_request("short", 400, 2, arrival=now)
    plan, _ = step(scheduler, now)
    assert plan.prefills[0].request_id == "long"
    assert plan.predicted_time >= 0.05 * 0.9


def test_at_most_one_long_prefill_per_kvp_group_per_batch() -> None:
    scheduler = make_scheduler(
        policy="lars", long_prefill_threshold=4096, target_batch_time=0.05, num_blocks=20_000
    )
    # b, more urgent, cuts into a (twins arriving together would go one after the other).
    arrivals = [Arrival("a", 0.0, 60_000, 2, deadline=30.0)]
    arrivals.append(Arrival("b", 1.0, 60_000, 2, deadline=5.0))
    result = drive(scheduler, arrivals)
    assert set(result.finished) == {"a", "b"}
    long_plans: dict[str, list[int]] = {"a": [], "b": []}
    for index, plan in enumerate(result.plans):
        longs = [seq.request_id for seq in plan.prefills if seq.start >= 4096]
        assert len(longs) <= 1
        for request_id in longs:
            long_plans[request_id].append(index)
    # Both were long prefills in progress at the same time, so the rule was exercised.
    assert min(long_plans["a"]) < max(long_plans["b"]) and min(long_plans["b"]) < max(
        long_plans["a"]
    )


@pytest.mark.parametrize("policy", ["edf", "srpt", "lrs", "lars"])
def test_adaptive_chunks_are_multiples_of_32_unless_they_finish_the_prompt(policy: str) -> None:
    scheduler = make_scheduler(policy=policy, target_batch_time=0.04)
    arrivals = [Arrival(f"r{i}", 0.05 * i, 2000 + 1777 * i, 3) for i in range(8)]
    result = drive(scheduler, arrivals)
    for plan in result.plans:
        for seq in plan.prefills:
            assert seq.q_tokens % 32 == 0 or seq.samples
            assert 32 <= seq.q_tokens <= 8192 or seq.samples
