"""The lead guard (medha.scheduler.lead_guard): two chats that arrive together go one after the
other rather than in turns; a document's chats still preempt it on LARS's schedule; pausing
obeys the same rule; the baseline policies are unaffected."""

from __future__ import annotations

import itertools

import pytest

from medha.scheduler import BatchPlan, Scheduler, SeqKind
from medha.scheduler.lead_guard import (
    MAX_CHALLENGERS,
    challenger_terms,
    keeps_lead,
    promote_guarded,
)
from medha.scheduler.pausing import overtake_time
from tests.scheduler_support import (
    Arrival,
    DriverResult,
    ToyCost,
    drive,
    make_scheduler,
    step,
)

CHAT = 2_000
"""~46 ms alone on the toy cost model: eight or so chunks at a 10 ms budget."""


def _two_chats(lead_guard: bool, gap: float = 0.001) -> tuple[DriverResult, list[str]]:
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.01, num_blocks=2_000, lead_guard=lead_guard
    )
    arrivals = [Arrival("a", 0.0, CHAT, 2), Arrival("b", gap, CHAT, 2)]
    result = drive(scheduler, arrivals)
    order = [
        seq.request_id for plan in result.plans for seq in plan.seqs if seq.kind.value == "prefill"
    ]
    return result, order


def _turns(order: list[str]) -> int:
    return sum(1 for before, after in itertools.pairwise(order) if before != after)


def test_keeps_lead_compares_each_key_after_waiting_for_the_other() -> None:
    # key(t) = base - rate t. I: base 0.5, rate 2 (d = 0.5 s), 0.3 s left; C: base 0.4,
    # rate 2, 0.3 s left. At t = 0: key_I(0.3) = -0.1 against key_C(0.3) = -0.2.
    assert not keeps_lead((0.5, 2.0), 0.3, (0.4, 2.0), 0.3, 0.0)
    assert keeps_lead((0.4, 2.0), 0.3, (0.5, 2.0), 0.3, 0.0)
    # A document (rate 1/15) against a chat: waiting the document's 10 s costs the chat 20.
    assert not keeps_lead((0.0, 1 / 15), 10.0, (0.3, 2.0), 0.05, 0.0)
    # ... unless the document has only milliseconds of work left.
    assert keeps_lead((-1.0, 1 / 15), 0.01, (-0.9, 2.0), 0.05, 0.0)
    # Keys that do not move: the challenger, ranked ahead, stays ahead.
    assert not keeps_lead((2.0, 0.0), 0.01, (1.0, 0.0), 5.0, 0.0)


def test_challenger_terms_are_the_guard_as_one_more_key_to_beat() -> None:
    incumbent, challenger = (0.5, 2.0), (0.45, 3.0)
    w_i, w_c = 0.2, 0.1
    extra = challenger_terms(incumbent, w_i, challenger, w_c)
    for t in (0.0, 0.01, 0.02, 0.05, 0.1, 0.3):
        below = challenger[0] - challenger[1] * t < extra[0] - extra[1] * t
        assert below == (not keeps_lead(incumbent, w_i, challenger, w_c, t))


def test_a_tie_is_a_tie_whatever_the_rounding() -> None:
    # 0.1 + 0.2 is 0.30000000000000004: the sides of a tie, computed from other terms.
    assert 0.1 + 0.2 > 0.3
    assert keeps_lead((0.1 + 0.2, 0.0), 0.0, (0.3, 0.0), 0.0, 0.0)
    # Against a challenger that started too, a tie leaves it ahead (no handing back and forth).
    assert not keeps_lead((0.1 + 0.2, 0.0), 0.0, (0.3, 0.0), 0.0, 0.0, ties_keep=False)
    assert keeps_lead((0.29, 0.0), 0.0, (0.3, 0.0), 0.0, 0.0, ties_keep=False)
    # More than rounding is no tie.
    assert not keeps_lead((0.3 + 1e-6, 0.0), 0.0, (0.3, 0.0), 0.0, 0.0)


# gap 0: the same instant, where the rule's two sides are equal and only rounding told them
# apart (the second chat started, and they took turns).
@pytest.mark.parametrize("gap", [0.0, 0.001, 0.01, 0.03])
def test_two_chats_that_arrive_together_go_one_after_the_other(gap: float) -> None:
    guarded, order = _two_chats(lead_guard=True, gap=gap)
    assert _turns(order) == 1 and order[0] == "a"
    unguarded, unguarded_order = _two_chats(lead_guard=False, gap=gap)
    assert _turns(unguarded_order) > 3, "LARS alone takes turns: the guard has nothing to fix"
    # The earlier chat gets its first token at its alone time, not at the end with the other;
    # the later one, which finishes last either way, no later than when they took turns.
    alone = _alone_ttft()
    assert guarded.ttft("a") == pytest.approx(alone)
    assert unguarded.ttft("a") > 1.2 * alone
    assert guarded.ttft("b") <= unguarded.ttft("b") + 1e-9


def _alone_ttft() -> float:
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.01, num_blocks=2_000, lead_guard=True
    )
    return drive(scheduler, [Arrival("a", 0.0, CHAT, 2)]).ttft("a")


def test_a_later_chat_with_an_earlier_deadline_still_preempts_a_started_one() -> None:
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.01, num_blocks=2_000, lead_guard=True
    )
    result = drive(
        scheduler,
        [Arrival("a", 0.0, 4 * CHAT, 2, deadline=5.0), Arrival("b", 0.02, CHAT, 2, deadline=0.15)],
    )
    assert result.ttft("b") <= _alone_ttft() + 0.011  # at most the chunk in flight first
    assert result.ttft("a") > 0.02 + result.ttft("b")


@pytest.mark.parametrize("doc_deadline", [0.8, 1.0, 1.5])
def test_a_chat_that_cut_into_a_document_keeps_the_lead_to_its_first_token(
    doc_deadline: float,
) -> None:
    """Once the chat runs, its slack stops falling and the document's key falls below its
    own: LARS alone hands the document the budget back, and the two take turns. Both started,
    the rule still holds between them: the chat would lose far more by waiting."""

    def run(lead_guard: bool) -> tuple[DriverResult, str]:
        scheduler = make_scheduler(
            ToyCost(iteration_budget=0.01),  # prefill times with their iterations' overheads
            policy="lars",
            target_batch_time=0.01,
            num_blocks=20_000,
            lead_guard=lead_guard,
        )
        arrivals = [Arrival("doc", 0.0, 12_000, 2, deadline=doc_deadline)]
        arrivals.append(Arrival("chat", 0.3, CHAT, 2))
        result = drive(scheduler, arrivals)
        first_token = 0.3 + result.ttft("chat")
        firsts = "".join(
            "C" if plan.prefills[0].request_id == "chat" else "d"
            for plan in result.plans
            if plan.prefills and 0.3 <= plan.created_at < first_token
        )
        return result, firsts

    guarded, order = run(lead_guard=True)
    unguarded, unguarded_order = run(lead_guard=False)
    assert "Cd" in unguarded_order.rstrip("d"), "LARS alone takes turns: nothing to fix"
    chat_runs = order[order.index("C") :].rstrip("d")
    assert set(chat_runs) == {"C"}, order
    assert guarded.ttft("chat") < unguarded.ttft("chat")


def test_twins_both_started_go_one_after_the_other() -> None:
    """Two prompts of one length arriving together both start (a 1,536-token chunk cap leaves
    the budget room for two): a tie by the rule, which the earlier arrival wins on every
    iteration, where LARS's rank flips with every chunk."""

    def fronts(lead_guard: bool) -> tuple[DriverResult, str]:
        scheduler = make_scheduler(
            policy="lars",
            target_batch_time=0.05,
            num_blocks=5_000,
            max_chunk=1536,
            lead_guard=lead_guard,
        )
        result = drive(scheduler, [Arrival("a", 0.0, 8_000, 2), Arrival("b", 0.0, 8_000, 2)])
        firsts = "".join(
            next(seq.request_id for seq in plan.seqs if seq.kind is SeqKind.PREFILL)
            for plan in result.plans
            if any(seq.kind is SeqKind.PREFILL for seq in plan.seqs)
        )
        return result, firsts

    guarded, order = fronts(lead_guard=True)
    unguarded, unguarded_order = fronts(lead_guard=False)
    assert _turns(list(unguarded_order)) > 3, "LARS alone takes turns: nothing to fix"
    assert _turns(list(order)) == 1 and order[0] == "a", order
    assert guarded.ttft("a") < unguarded.ttft("a")
    assert guarded.ttft("b") <= unguarded.ttft("b") + 1e-9


def _doc_and_chats(lead_guard: bool) -> DriverResult:
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.05, num_blocks=20_000, lead_guard=lead_guard
    )
    arrivals = [Arrival("doc", 0.0, 60_000, 4)]
    arrivals += [Arrival(f"chat{i}", 0.4 + 0.9 * i, 1_000 + 50 * i, 3) for i in range(6)]
    return drive(scheduler, arrivals)


def test_chats_that_do_not_overlap_preempt_a_document_exactly_as_under_lars() -> None:
    guarded, unguarded = _doc_and_chats(True), _doc_and_chats(False)
    for request_id in ("doc", *(f"chat{i}" for i in range(6))):
        assert guarded.ttft(request_id) == pytest.approx(unguarded.ttft(request_id))
    assert all(guarded.ttft(f"chat{i}") < 0.5 for i in range(6))


def _chat_in_flight(lead_guard: bool) -> tuple[Scheduler, BatchPlan]:
    """Chat a's second chunk in flight when b arrives: b's deadline is 6 ms later, but its
    relative slack falls faster (d = 0.495 s against a's 0.5 s), so LARS alone lets it
    overtake in the end; a has ~0.04 s of work left, so the guard holds it off longer."""
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.01, num_blocks=2_000, lead_guard=lead_guard
    )
    scheduler.add_request("a", CHAT, 2, arrival=0.0)
    step(scheduler, 0.0)
    plan = scheduler.schedule(0.01)
    assert [seq.request_id for seq in plan.seqs] == ["a"]
    scheduler.add_request("b", CHAT, 2, arrival=0.011, deadline=0.495)
    return scheduler, plan


def test_pausing_for_a_newcomer_waits_for_the_guard_too() -> None:
    scheduler, plan = _chat_in_flight(lead_guard=False)
    due = scheduler.pause_time(plan, 0.011)
    assert due is not None and 0.5 < due < 0.7
    scheduler, plan = _chat_in_flight(lead_guard=True)
    due = scheduler.pause_time(plan, 0.011)
    assert due is not None and due > 0.9


def test_overtake_time_with_guard_terms_is_when_both_tests_first_pass() -> None:
    incumbent, w_i = (0.3, 1 / 15), 8.0  # a document, late-ish
    newcomer, w_c = (0.5, 2.0), 0.05  # a chat
    terms = [incumbent, challenger_terms(incumbent, w_i, newcomer, w_c)]
    at = overtake_time(newcomer, terms, 0.0)
    assert at is not None
    # At `at` the chat is ahead by the key and past the guard; a moment before, not both.
    for t, expected in ((at, True), (at - 1e-3, False)):
        ahead = newcomer[0] - newcomer[1] * t < incumbent[0] - incumbent[1] * t
        past = not keeps_lead(incumbent, w_i, newcomer, w_c, t)
        assert (ahead and past) == expected


def _plans(policy: str, lead_guard: bool) -> list[tuple[tuple[str, int, int], ...]]:
    arrivals = [Arrival("long", 0.0, 60_000, 4)]
    arrivals += [Arrival(f"s{i}", 0.3 + 0.017 * i, 1_300 + 97 * i, 3) for i in range(30)]
    # Ties: equal keys under FCFS and EDF (same arrival, length and deadline).
    arrivals += [Arrival(f"t{i}", 0.9, 1_500, 3) for i in range(4)]
    scheduler = make_scheduler(
        policy=policy, target_batch_time=0.02, num_blocks=20_000, lead_guard=lead_guard
    )
    result = drive(scheduler, arrivals)
    return [tuple((s.request_id, s.start, s.end) for s in p.seqs) for p in result.plans]


@pytest.mark.parametrize("policy", ["fcfs", "fcfs-chunked", "edf", "srpt", "lrs"])
def test_the_baseline_policies_ignore_the_guard(policy: str) -> None:
    assert _plans(policy, lead_guard=True) == _plans(policy, lead_guard=False)


def test_the_guard_does_change_lars_plans_on_the_same_workload() -> None:
    assert _plans("lars", lead_guard=True) != _plans("lars", lead_guard=False)


@pytest.mark.parametrize("crowd", [MAX_CHALLENGERS, MAX_CHALLENGERS + 1])
def test_a_started_prefill_holds_off_at_most_max_challengers(crowd: int) -> None:
    scheduler = make_scheduler(
        policy="lars", target_batch_time=0.01, num_blocks=5_000, lead_guard=True
    )
    scheduler.add_request("a", CHAT, 2, arrival=0.0)
    first, _ = step(scheduler, 0.0)
    # Chats arriving while a's first chunk runs rank ahead of a (its relative slack rose by
    # the chunk), though a's deadline is the earliest: the guard holds them off, up to a point.
    for i in range(crowd):
        scheduler.add_request(f"c{i}", CHAT, 2, arrival=0.001)
    plan = scheduler.schedule(first.predicted_time)
    prefills = [seq.request_id for seq in plan.seqs if seq.kind is SeqKind.PREFILL]
    assert (prefills[0] == "a") == (crowd <= MAX_CHALLENGERS)


@pytest.mark.parametrize("flag", [True, False])
def test_the_engine_config_passes_the_guard_to_the_scheduler(flag: bool) -> None:
    from medha import EngineConfig
    from medha.engine_setup import build_scheduler_config

    config = build_scheduler_config(EngineConfig(model="tiny-random", lead_guard=flag), 100)
    assert config.lead_guard is flag


class _Prefill:
    """What promote_guarded reads of a candidate: key terms and remaining work."""

    def __init__(self, base: float, rate: float, work: float, order: int) -> None:
        self.key_base, self.key_rate, self.work, self.order = base, rate, work, order
        self.rank = base
        """Where the candidate order puts it (its key at the ranking time)."""

    def remaining_prefill_s(self, cost: object) -> float:
        return self.work


class _Candidates:
    """CandidateOrder's part promote_guarded uses: started prefills and queued ones by key."""

    def __init__(self, started: list[_Prefill], queued: list[_Prefill]) -> None:
        self.ranked = sorted(
            [(p.rank, i, p, True) for i, p in enumerate(started)]
            + [(p.rank, len(started) + i, p, False) for i, p in enumerate(queued)],
            key=lambda item: item[:2],
        )
        self.promoted: _Prefill | None = None

    def started(self) -> list[tuple[float, int, _Prefill]]:
        return [(key, order, p) for key, order, p, started in self.ranked if started]

    def ahead_of(self, key: float, order: int, limit: int) -> list[_Prefill]:
        ahead = [item for item in self.ranked if item[:2] < (key, order)]
        return [p for *_, p, started in ahead if started] + [
            p for *_, p, started in ahead if not started
        ]

    def promote(self, request: _Prefill) -> None:
        self.promoted = request


def test_between_two_started_prefills_a_tie_goes_to_the_earlier_arrival() -> None:
    # Keys that do not move (rate 0) and equal work: each would lose as much as it makes the
    # other lose. 0.1 + 0.2 ranks just behind 0.3, by rounding alone.
    earlier, later = _Prefill(0.1 + 0.2, 0.0, 0.05, order=0), _Prefill(0.3, 0.0, 0.05, order=1)
    candidates = _Candidates([earlier, later], [])
    assert [p for *_, p in candidates.started()] == [later, earlier]
    promote_guarded(candidates, cost=None, at=0.0)  # type: ignore[arg-type]
    assert candidates.promoted is earlier
    # Ranked ahead already, the earlier arrival keeps the front without a promotion.
    earlier, later = _Prefill(0.3, 0.0, 0.05, order=0), _Prefill(0.1 + 0.2, 0.0, 0.05, order=1)
    candidates = _Candidates([earlier, later], [])
    promote_guarded(candidates, cost=None, at=0.0)  # type: ignore[arg-type]
    assert candidates.promoted is None
    # Tied with a queued challenger, a started prefill keeps the lead, whoever came first.
    started, queued = _Prefill(0.1 + 0.2, 0.0, 0.05, order=1), _Prefill(0.3, 0.0, 0.05, order=0)
    candidates = _Candidates([started], [queued])
    promote_guarded(candidates, cost=None, at=0.0)  # type: ignore[arg-type]
    assert candidates.promoted is started


def test_a_started_prefill_ranked_behind_others_leads_only_if_it_beats_every_started_one() -> None:
    """The rule is pairwise and not transitive: a started prefill that beats the one ranked
    first but loses to another started one does not take the front (it would, on the
    iterations it ranked second, and lose it on the others)."""
    first = _Prefill(0.0, 1.0, 1.0, order=0)  # ranked first, 1 s of work left
    beats_first = _Prefill(0.2, 2.0, 0.05, order=1)  # a chat: loses much by waiting 1 s
    beats_both = _Prefill(0.1, 2.0, 0.01, order=2)  # a shorter chat, more urgent still
    assert keeps_lead((0.2, 2.0), 0.05, (0.0, 1.0), 1.0, 0.0)
    assert not keeps_lead((0.2, 2.0), 0.05, (0.1, 2.0), 0.01, 0.0)
    for ranking in ([first, beats_first, beats_both], [first, beats_both, beats_first]):
        for place, prefill in enumerate(ranking):
            prefill.rank = place
        candidates = _Candidates(ranking, [])
        assert [p for *_, p in candidates.started()] == ranking
        promote_guarded(candidates, cost=None, at=0.0)  # type: ignore[arg-type]
        assert candidates.promoted is beats_both
