"""Pausing a plan between layers: when a newer request should go first (at once, or when it
overtakes under LARS; never under FCFS), and the bookkeeping of a paused plan: the plans issued
meanwhile complete before it, its budget, one paused plan at a time."""

from __future__ import annotations

import pytest

from medha.scheduler import BatchPlan, Scheduler, SeqKind
from medha.scheduler.pausing import PAST_TIE_S, overtake_time
from tests.scheduler_support import make_scheduler, step

DOC, CHAT = 100_000, 1000
"""Prompt lengths: ~10 s and ~26 ms alone on the toy cost model (default deadlines 15 s and
0.5 s)."""


def _doc_in_flight(policy: str = "lars", **config: object) -> tuple[Scheduler, BatchPlan]:
    scheduler = make_scheduler(**{"policy": policy, "num_blocks": 20_000, **config})
    scheduler.add_request("doc", DOC, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    assert [seq.request_id for seq in plan.seqs] == ["doc"]
    return scheduler, plan


def _run_inner(scheduler: Scheduler, now: float) -> BatchPlan:
    plan, _ = step(scheduler, now)
    return plan


def test_a_newcomer_ahead_of_the_plans_prefills_pauses_it_at_once() -> None:
    scheduler, plan = _doc_in_flight()
    assert scheduler.pause_time(plan, 0.01) is None
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    assert scheduler.pause_time(plan, 0.01) == 0.01
    assert scheduler.should_pause(plan, 0.01)


def test_under_lars_a_newcomer_pauses_the_plan_when_it_overtakes() -> None:
    scheduler, plan = _doc_in_flight()
    scheduler.add_request("chat", CHAT, 4, arrival=0.01)  # default deadline: 0.5 s
    due = scheduler.pause_time(plan, 0.01)
    # Its relative slack falls at 1/0.5 s, the document's at 1/15 s: it overtakes in ~0.3 s.
    assert due is not None and 0.1 < due < 0.5
    assert not scheduler.should_pause(plan, 0.01)
    assert not scheduler.should_pause(plan, due - 10 * PAST_TIE_S)
    assert scheduler.should_pause(plan, due)
    assert scheduler.pause_time(plan, due + 0.05) == due + 0.05


def test_a_plan_that_took_the_lone_budget_pauses_for_any_newcomer() -> None:
    # Its budget assumed nobody else was there: a chat with a lax deadline, which LARS would
    # not put ahead of the document for seconds, stops it at once.
    scheduler, plan = _doc_in_flight(lone_batch_time=0.15)
    assert plan.predicted_time > 0.05 * 1.25
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=5.0)
    assert scheduler.pause_time(plan, 0.01) == 0.01
    # An ordinary plan leaves that chat to the ranking.
    scheduler, plan = _doc_in_flight()
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=5.0)
    due = scheduler.pause_time(plan, 0.01)
    assert due is None or due > 1.0


@pytest.mark.parametrize("policy", ["fcfs", "fcfs-chunked"])
def test_under_fcfs_a_newcomer_never_pauses_a_plan(policy: str) -> None:
    scheduler, plan = _doc_in_flight(policy)
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.001)
    assert scheduler.pause_time(plan, 0.01) is None
    assert not scheduler.should_pause(plan, 100.0)


def test_a_request_the_plan_could_have_known_does_not_pause_it() -> None:
    scheduler, plan = _doc_in_flight()
    scheduler.add_request("chat", CHAT, 4, arrival=0.0, deadline=0.1)  # when the plan was made
    assert scheduler.pause_time(plan, 0.01) is None


def test_a_plan_of_decodes_alone_never_pauses() -> None:
    scheduler = make_scheduler(num_blocks=20_000)
    scheduler.add_request("a", CHAT, 8, arrival=0.0)
    step(scheduler, 0.0)  # its whole prompt: it decodes from now on
    plan = scheduler.schedule(0.1)
    assert [seq.kind for seq in plan.seqs] == [SeqKind.DECODE]
    scheduler.add_request("chat", CHAT, 4, arrival=0.11, deadline=0.01)
    assert scheduler.pause_time(plan, 0.11) is None


def test_a_newcomer_that_cannot_start_does_not_pause_a_plan() -> None:
    scheduler, plan = _doc_in_flight(num_blocks=DOC // 16 + 10)  # no room for the chat
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    assert scheduler.pause_time(plan, 0.01) is None


def test_plans_issued_while_one_is_paused_complete_before_it() -> None:
    scheduler, paused = _doc_in_flight()
    doc_end = paused.seqs[0].end
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    assert scheduler.schedule(0.01).is_empty  # stage 0 busy: the doc's plan runs
    scheduler.suspend(paused)
    inner = scheduler.schedule(0.02)
    assert [seq.request_id for seq in inner.seqs] == ["chat"]  # never the doc: it is in flight
    with pytest.raises(ValueError, match="cannot resume"):
        scheduler.resume(paused)
    scheduler.on_stage0_done(inner)
    assert scheduler.on_step_done(inner, 0.05) == []
    assert scheduler.get("chat").first_token_time == 0.05  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="is paused"):
        scheduler.on_step_done(paused, 0.06)
    assert not scheduler.should_pause(paused, 0.06)  # nothing left ahead of it
    scheduler.resume(paused)
    assert scheduler.schedule(0.06).is_empty  # it holds stage 0 again
    scheduler.on_stage0_done(paused)
    scheduler.on_step_done(paused, 0.3)
    assert scheduler.get("doc").computed == doc_end  # type: ignore[union-attr]
    nxt = scheduler.schedule(0.3)
    assert {seq.request_id for seq in nxt.seqs} == {"doc", "chat"}


def test_only_one_plan_is_paused_at_a_time() -> None:
    scheduler, paused = _doc_in_flight()
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    scheduler.suspend(paused)
    inner = scheduler.schedule(0.02)
    scheduler.add_request("urgent", CHAT, 4, arrival=0.03, deadline=0.01)
    assert scheduler.pause_time(inner, 0.03) is None  # the inner plan runs through
    assert scheduler.should_pause(paused, 0.03)  # ...and the paused plan stays paused


def test_a_paused_plan_waits_through_at_most_pause_budget_plans_over_all_its_pauses() -> None:
    scheduler, paused = _doc_in_flight(pause_budget=2)
    for i in range(4):
        scheduler.add_request(f"chat{i}", CHAT, 4, arrival=0.01, deadline=0.1)
    scheduler.suspend(paused)
    _run_inner(scheduler, 0.02)
    assert scheduler.should_pause(paused, 0.03)
    scheduler.resume(paused)
    assert scheduler.should_pause(paused, 0.03)  # running again, still within its budget
    scheduler.suspend(paused)
    _run_inner(scheduler, 0.04)
    assert not scheduler.should_pause(paused, 0.05)  # two plans waited through: its budget
    scheduler.resume(paused)
    scheduler.add_request("later", CHAT, 4, arrival=0.06, deadline=0.01)
    assert scheduler.pause_time(paused, 0.06) is None


def test_pause_budget_zero_or_a_pipeline_never_pauses() -> None:
    scheduler, plan = _doc_in_flight(pause_budget=0)
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    assert scheduler.pause_time(plan, 0.01) is None

    scheduler, plan = _doc_in_flight(pp_stages=2)
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    assert scheduler.pause_time(plan, 0.01) is None
    with pytest.raises(ValueError, match="one pipeline stage"):
        scheduler.suspend(plan)


def test_overtake_time_solves_the_key_inequalities() -> None:
    # Keys are base - rate x T; smaller goes first; the newcomer loses ties.
    assert overtake_time((1.0, 2.0), [(0.5, 1.0)], now=0.0) == pytest.approx(0.5 + PAST_TIE_S)
    assert overtake_time((1.0, 2.0), [(0.5, 1.0)], now=3.0) == 3.0  # ahead already
    assert overtake_time((1.0, 1.0), [(0.5, 1.0)], now=0.0) is None  # same rate, behind
    assert overtake_time((0.5, 1.0), [(0.5, 1.0)], now=0.0) is None  # a tie is not ahead
    # ...nor one by rounding alone (as the lead guard reads keys: its TIE_TOLERANCE).
    assert overtake_time((0.7771999999999999, 1.0), [(0.7772, 1.0)], now=0.0) is None
    assert overtake_time((0.7771, 1.0), [(0.7772, 1.0)], now=0.0) == 0.0
    # Relative to the keys at `now`, not to their bases: after a day's uptime a LARS key's base
    # is ~1e5 while its value is ~1, and a real gap of 1e-5 is no tie.
    assert overtake_time((1e5 + 0.99999, 1e5), [(1e5 + 1.0, 1e5)], now=1.0) == 1.0
    assert overtake_time((0.4, 1.0), [(0.5, 1.0)], now=0.0) == 0.0
    # Ahead of the first from T = 0.5, of the second until T = 1 (it falls faster): [0.5, 1).
    assert overtake_time((1.0, 2.0), [(0.5, 1.0), (2.0, 3.0)], now=0.0) == pytest.approx(
        0.5 + PAST_TIE_S
    )
    # ...but only until T = 0.4 against this one: never ahead of both.
    assert overtake_time((1.0, 2.0), [(0.5, 1.0), (1.8, 4.0)], now=0.0) is None
    assert overtake_time((0.0, 0.0), [], now=0.0) is None


def test_a_pausing_plans_decodes_finish_at_once_and_decode_again_while_it_waits() -> None:
    scheduler = make_scheduler(num_blocks=20_000)
    scheduler.add_request("talker", CHAT, 8, arrival=0.0)
    step(scheduler, 0.0)  # its prompt: it decodes from now on
    scheduler.add_request("doc", DOC, 4, arrival=0.01)
    paused = scheduler.schedule(0.01)
    assert {(s.request_id, s.kind) for s in paused.seqs} == {
        ("talker", SeqKind.DECODE),
        ("doc", SeqKind.PREFILL),
    }
    scheduler.add_request("chat", CHAT, 4, arrival=0.02, deadline=0.1)
    assert scheduler.should_pause(paused, 0.02)
    assert scheduler.on_seqs_done(paused, ["talker"], 0.02) == []
    scheduler.suspend(paused)
    talker = scheduler.get("talker")
    assert talker is not None and talker.generated == 2 and talker.in_flight == 0
    inner = _run_inner(scheduler, 0.03)
    assert {s.request_id for s in inner.seqs} == {"talker", "chat"}  # its next decode
    assert talker.generated == 3
    scheduler.resume(paused)
    scheduler.on_stage0_done(paused)
    scheduler.on_step_done(paused, 0.3)
    assert talker.generated == 3  # counted once
    assert scheduler.get("doc").computed == paused.seqs[-1].end  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="stage 0"):
        scheduler.on_seqs_done(inner, ["talker"], 0.3)


def test_a_plans_prefills_are_ranked_with_the_work_it_counted_when_it_was_made() -> None:
    # The plan holds a whole small prompt: once issued, no work is left for it. Ranked that
    # way, an identical request arriving 10 ms later would look more urgent and pause it.
    scheduler = make_scheduler(num_blocks=20_000)
    scheduler.add_request("first", CHAT, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    assert plan.seqs[0].end == CHAT
    scheduler.add_request("second", CHAT, 4, arrival=0.01)
    assert scheduler.pause_time(plan, 0.01) is None
    assert not scheduler.should_pause(plan, 10.0)


def test_a_plan_whose_pause_ran_nothing_may_not_pause_again() -> None:
    scheduler, paused = _doc_in_flight()
    scheduler.add_request("chat", CHAT, 4, arrival=0.01, deadline=0.1)
    scheduler.suspend(paused)
    scheduler.resume(paused, pause_again=False)
    assert scheduler.pause_time(paused, 0.02) is None
    scheduler.add_request("urgent", CHAT, 4, arrival=0.03, deadline=0.01)
    assert scheduler.pause_time(paused, 0.03) is None
