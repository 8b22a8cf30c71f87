"""Priority keys: FCFS, EDF, SRPT, LRS (raw slack), LARS (relative slack), and deadlines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.scheduler import POLICY_NAMES, SchedulerConfig
from medha.scheduler.policies import (
    ChunkingMode,
    default_deadline,
    policy_for,
    relative_slack,
    slack,
)
from medha.scheduler.ranking import CandidateOrder, Ranked
from medha.scheduler.request import SchedRequest
from tests.scheduler_support import Arrival, ToyCost, drive, make_scheduler, step

COST = ToyCost()


def _request(
    request_id: str, arrival: float, deadline: float, total_prefill_s: float, order: int = 0
) -> SchedRequest:
    # ToyCost: prefill_time is ~2e-5 s/token for short prompts; pick a prompt that matches.
    return SchedRequest(request_id, arrival, 1000, 8, deadline, True, total_prefill_s, order)


def test_default_deadline_is_one_and_a_half_times_the_prefill_with_a_half_second_floor() -> None:
    config = SchedulerConfig()
    assert default_deadline(10.0, config) == pytest.approx(15.0)
    assert default_deadline(0.02, config) == pytest.approx(0.5)


def test_a_caller_deadline_replaces_the_default() -> None:
    scheduler = make_scheduler(num_blocks=10_000)
    given_deadline = scheduler.add_request("a", 1000, 4, arrival=0.0, deadline=0.2)
    default = scheduler.add_request("b", 100_000, 4, arrival=0.0)
    assert given_deadline.deadline == 0.2 and given_deadline.deadline_given
    assert default.deadline == pytest.approx(1.5 * COST.prefill_time(100_000))
    assert not default.deadline_given


def test_slack_and_relative_slack_follow_the_formulas() -> None:
    request = _request("r", arrival=1.0, deadline=2.0, total_prefill_s=0.5)
    # s = a + d - t - w = 1 + 2 - 1.5 - 0.5 ; rho = s / d
    assert slack(request, 1.5, COST) == pytest.approx(1.0)
    assert relative_slack(request, 1.5, COST) == pytest.approx(0.5)


def test_every_policy_name_is_selectable_and_unknown_names_are_rejected() -> None:
    chunking = {name: policy_for(name).chunking for name in POLICY_NAMES}
    assert chunking["fcfs"] is ChunkingMode.WHOLE
    assert chunking["fcfs-chunked"] is ChunkingMode.FIXED
    assert {chunking[n] for n in ("edf", "srpt", "lrs", "lars")} == {ChunkingMode.ADAPTIVE}
    with pytest.raises(ValueError, match="unknown policy"):
        policy_for("sjf")  # type: ignore[arg-type]


def test_lars_lets_a_waiting_short_request_overtake_a_long_one_within_its_deadline() -> None:
    lars = policy_for("lars").priority
    long = _request("long", arrival=0.0, deadline=15.0, total_prefill_s=10.0)
    short = _request("short", arrival=1.0, deadline=0.5, total_prefill_s=0.03)
    assert lars.key(long, 1.0, COST) < lars.key(short, 1.0, COST)  # fresh short can wait
    assert lars.key(short, 1.4, COST) < lars.key(long, 1.4, COST)  # ...but not for long


def test_edf_puts_a_long_request_past_its_deadline_before_every_new_short_one() -> None:
    edf = policy_for("edf").priority
    long = _request("long", arrival=0.0, deadline=15.0, total_prefill_s=10.0)
    short = _request("short", arrival=14.8, deadline=0.5, total_prefill_s=0.03)
    assert edf.key(long, 14.8, COST) < edf.key(short, 14.8, COST)


def test_srpt_always_prefers_the_shorter_remaining_work() -> None:
    srpt = policy_for("srpt").priority
    long = _request("long", arrival=0.0, deadline=15.0, total_prefill_s=10.0)
    short = _request("short", arrival=100.0, deadline=0.5, total_prefill_s=0.03)
    assert srpt.key(short, 100.0, COST) < srpt.key(long, 100.0, COST)


def test_lrs_and_lars_disagree_on_a_long_request_with_more_absolute_slack() -> None:
    # Long: slack 2 s of a 30 s budget (rho 0.07); short: slack 0.4 s of 0.5 s (rho 0.8).
    long = _request("long", arrival=0.0, deadline=30.0, total_prefill_s=28.0)
    short = _request("short", arrival=0.0, deadline=0.5, total_prefill_s=0.1)
    lrs, lars = policy_for("lrs").priority, policy_for("lars").priority
    assert lrs.key(short, 0.0, COST) < lrs.key(long, 0.0, COST)
    assert lars.key(long, 0.0, COST) < lars.key(short, 0.0, COST)


def test_fcfs_orders_by_arrival() -> None:
    fcfs = policy_for("fcfs").priority
    early = _request("early", arrival=0.0, deadline=100.0, total_prefill_s=50.0)
    late = _request("late", arrival=1.0, deadline=0.5, total_prefill_s=0.01)
    assert fcfs.key(early, 5.0, COST) < fcfs.key(late, 5.0, COST)


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["fcfs", "edf", "srpt", "lrs", "lars"]),
    arrival=st.floats(0, 100),
    deadline=st.floats(0.01, 100),
    work=st.floats(0, 50),
    now=st.floats(0, 200),
)
def test_cached_ranking_equals_the_key_recomputed_from_scratch(
    name: str, arrival: float, deadline: float, work: float, now: float
) -> None:
    policy = policy_for(name).priority  # type: ignore[arg-type]
    request = _request("r", arrival, deadline, work)
    expected = {
        "fcfs": arrival,
        "edf": arrival + deadline,
        "srpt": work,
        "lrs": arrival + deadline - now - work,
        "lars": (arrival + deadline - now - work) / deadline,
    }[name]
    (ranked_key, _, _), *_ = policy.ranked([request], now, COST)
    assert ranked_key == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert policy.key(request, now, COST) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_ranking_refreshes_a_key_once_the_requests_cursor_moves() -> None:
    lars = policy_for("lars").priority
    scheduler = make_scheduler(num_blocks=10_000)
    request = scheduler.add_request("r", 50_000, 4, arrival=0.0)
    before = lars.ranked([request], 0.0, COST)[0][0]
    request.issued = 40_000  # most of the prefill is done: much more slack
    after = lars.ranked([request], 0.0, COST)[0][0]
    assert after > before
    assert after == pytest.approx(relative_slack(request, 0.0, COST))


# Keys from a few values, so that ties (broken by arrival order) are common.
STARTED_KEYS = st.sampled_from([0.0, 0.5, 1.0, 2.0])
QUEUED_KEYS = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])


def _candidates(
    started_keys: list[float], queued_keys: list[float], data: st.DataObject
) -> tuple[list[Ranked], list[Ranked], CandidateOrder]:
    """Requests with random arrival orders: the started ones as (key, order, request), the
    queued ones likewise sorted, and a CandidateOrder over both."""
    orders = data.draw(st.permutations(range(len(started_keys) + len(queued_keys))))
    requests = [_request(f"r{i}", 0.0, 1.0, 0.0, order=o) for i, o in enumerate(orders)]
    started = [
        (key, r.order, r)
        for key, r in zip(started_keys, requests[: len(started_keys)], strict=True)
    ]
    fresh = requests[len(started_keys) :]
    keys_by_id = {r.request_id: k for r, k in zip(fresh, queued_keys, strict=True)}
    queued = sorted(fresh, key=lambda r: r.order)
    candidates = CandidateOrder(list(started), queued, [keys_by_id[r.request_id] for r in queued])
    return started, sorted((keys_by_id[r.request_id], r.order, r) for r in queued), candidates


@settings(max_examples=200, deadline=None)
@given(
    started_keys=st.lists(STARTED_KEYS, max_size=6),
    queued_keys=st.lists(QUEUED_KEYS, max_size=12),
    drop_after=st.integers(0, 20),
    data=st.data(),
)
def test_candidate_order_pops_what_one_sorted_list_of_key_and_arrival_would(
    started_keys: list[float], queued_keys: list[float], drop_after: int, data: st.DataObject
) -> None:
    """Merging the running prefills' heap with the queue sorted by float key alone must give
    exactly the (key, arrival order) order, ties included, and drop_queued must leave the
    running ones in that order."""
    started, queued, candidates = _candidates(started_keys, queued_keys, data)
    expected = sorted(started + queued)
    popped: list[SchedRequest] = []
    dropped = False
    while candidates:
        if len(popped) == drop_after and not dropped:
            candidates.drop_queued()
            dropped = True
            expected = expected[:drop_after] + [e for e in expected[drop_after:] if e in started]
            continue
        popped.append(candidates.pop())
    assert [r.request_id for r in popped] == [e[2].request_id for e in expected]


@settings(max_examples=200, deadline=None)
@given(
    started_keys=st.lists(STARTED_KEYS, min_size=1, max_size=5),
    queued_keys=st.lists(QUEUED_KEYS, max_size=10),
    limit=st.integers(1, 8),
    data=st.data(),
)
def test_candidate_order_lists_who_is_ahead_and_promotes_a_started_prefill(
    started_keys: list[float], queued_keys: list[float], limit: int, data: st.DataObject
) -> None:
    """ahead_of: the started, then the queued, ranked ahead of a (key, order), each best
    first, up to `limit`; promote: that request pops first, the rest in their order."""
    started, queued_ranked, candidates = _candidates(started_keys, queued_keys, data)
    incumbent = data.draw(st.sampled_from(started))
    ahead = candidates.ahead_of(incumbent[0], incumbent[1], limit)
    expected = [e for e in sorted(started) if e[:2] < incumbent[:2]]
    expected += [e for e in queued_ranked if e[:2] < incumbent[:2]]
    assert [r.request_id for r in ahead] == [e[2].request_id for e in expected[:limit]]
    candidates.promote(incumbent[2])
    popped = []
    while candidates:
        popped.append(candidates.pop().request_id)
    rest = sorted(e for e in started + queued_ranked if e[2] is not incumbent[2])
    assert popped == [incumbent[2].request_id] + [e[2].request_id for e in rest]


def test_a_preempted_request_goes_back_to_its_arrival_place_in_the_queue() -> None:
    scheduler = make_scheduler(num_blocks=10_000)
    first = scheduler.add_request("first", 100, 4, arrival=0.0)
    scheduler.schedule(0.0)  # starts "first" (and nothing else is queued yet)
    scheduler.add_request("second", 100, 4, arrival=1.0)
    scheduler.table.preempt(first)
    assert [r.request_id for r in scheduler.table.queued_by_arrival()] == ["first", "second"]


# -- ranking at the next decision (SchedulerConfig.rank_ahead) -------------------------------------


def _short_prefill_in_the_next_batch(rank_ahead: bool, pp_stages: int = 1) -> tuple[int, bool]:
    """A long prompt is running (rho ~ 1/3) when a 5,000-token prompt (~0.13 s of prefill)
    with a 0.4 s deadline arrives: its rho is ~0.68 now and ~0.05 one 0.25 s iteration later.
    Only one of the two fits the budget. (Tokens of the short prompt in the next batch, whether
    that batch gives its first token.)"""
    scheduler = make_scheduler(
        policy="lars",
        target_batch_time=0.25,
        num_blocks=20_000,
        rank_ahead=rank_ahead,
        pp_stages=pp_stages,
    )
    scheduler.add_request("long", 100_000, 4, arrival=0.0)
    plan, _ = step(scheduler, 0.0)
    assert [seq.request_id for seq in plan.seqs] == ["long"]
    scheduler.add_request("short", 5_000, 4, arrival=0.25, deadline=0.4)
    plan = scheduler.schedule(0.25)
    short = [seq for seq in plan.seqs if seq.request_id == "short"]
    return (short[0].q_tokens, short[0].samples) if short else (0, False)


def test_lars_ranks_at_the_next_decision_so_a_short_deadline_is_not_left_one_iteration_late() -> (
    None
):
    # Ranked now, the fresh prompt looks safe to defer: the long one takes the budget and the
    # short one's first token waits an iteration, past its 0.4 s deadline (0.25 + 0.25 + 0.13 s).
    tokens, first_token = _short_prefill_in_the_next_batch(rank_ahead=False)
    assert not first_token and tokens < 5_000
    # Ranked where the next decision will be, it goes now and meets it.
    assert _short_prefill_in_the_next_batch(rank_ahead=True) == (5_000, True)


def test_with_two_pipeline_stages_the_next_decision_is_half_a_budget_away() -> None:
    # The next micro-batch is planned when this one leaves stage 0, ~0.125 s from now: the
    # fresh prompt's rho then (~0.36) is still above the running one's, so it may wait.
    tokens, first_token = _short_prefill_in_the_next_batch(rank_ahead=True, pp_stages=2)
    assert not first_token and tokens < 5_000


def _plans(policy: str, rank_ahead: bool) -> list[tuple[tuple[str, int, int], ...]]:
    arrivals = [Arrival("long", 0.0, 60_000, 4)]
    arrivals += [
        Arrival(f"s{i}", 0.3 + 0.17 * i, 300 + 97 * i, 3, 0.2 + 0.1 * i) for i in range(30)
    ]
    scheduler = make_scheduler(
        policy=policy, target_batch_time=0.05, num_blocks=20_000, rank_ahead=rank_ahead
    )
    result = drive(scheduler, arrivals)
    return [tuple((s.request_id, s.start, s.end) for s in p.seqs) for p in result.plans]


@pytest.mark.parametrize("policy", ["fcfs-chunked", "edf", "srpt", "lrs"])
def test_ranking_ahead_changes_nothing_for_policies_whose_keys_move_together(policy: str) -> None:
    assert _plans(policy, rank_ahead=True) == _plans(policy, rank_ahead=False)


def test_ranking_ahead_does_change_lars_plans_on_the_same_workload() -> None:
    """The workload above can tell: LARS's keys fall at rates 1/d that differ per request."""
    assert _plans("lars", rank_ahead=True) != _plans("lars", rank_ahead=False)
