"""When an iteration in flight should stop between layers for a request that arrived after it
was planned.

The scheduler built the plan without the newer requests. One of them should go first if the
policy ranks it ahead of every prefill in the plan: what the scheduler would have decided had it
known the request. Every policy's key is affine in time (PriorityPolicy: key(t) = base - rate x
t), so "ranks ahead" is a set of linear inequalities in t, and the first moment it holds is
exact. The engine pauses at once when a newcomer is ahead already, or sets a timer for the
moment it overtakes: under LARS a short request overtakes a long prompt's prefill within a few
hundred ms of arriving (its relative slack falls at 1/d, with d its short deadline). Under FCFS,
EDF and SRPT, whose keys do not move with time, a newcomer that is not ahead when it arrives
never gets ahead; under FCFS it never is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from medha.scheduler.lead_guard import TIE_TOLERANCE, KeyTerms, challenger_terms
from medha.scheduler.plan import SeqKind
from medha.scheduler.prefix_sharing import SharedPrefixGate

if TYPE_CHECKING:
    from medha.scheduler.config import SchedulerConfig
    from medha.scheduler.cost import BatchCostModel
    from medha.scheduler.plan import BatchPlan
    from medha.scheduler.policies import PriorityPolicy
    from medha.scheduler.table import RequestTable

# A newer request loses ties (ties go to arrival order), so it is ahead only strictly after the
# moment the keys meet; the moment returned is this much later, so that a check made then holds.
PAST_TIE_S = 1e-4


def overtake_time(newcomer: KeyTerms, incumbents: Sequence[KeyTerms], now: float) -> float | None:
    """The earliest ranking time >= `now` at which `newcomer`'s key is below every one of
    `incumbents`' keys; None if that never happens (or `incumbents` is empty). Keys that never
    move apart and differ only by rounding (TIE_TOLERANCE, as the lead guard reads them) tie,
    which the newer request loses."""
    if not incumbents:
        return None
    base, rate = newcomer
    lower, upper = now, math.inf
    for other_base, other_rate in incumbents:
        # newcomer ahead at T  <=>  (base - other_base) < (rate - other_rate) x T
        gap, closing = base - other_base, rate - other_rate
        if closing == 0:
            # Relative to the keys now, as the guard weighs them (a LARS key's base grows with
            # the engine's uptime, its value at any one time does not).
            size = max(1.0, abs(base - rate * now), abs(other_base - other_rate * now))
            if gap >= -TIE_TOLERANCE * size:
                return None
        elif closing > 0:
            lower = max(lower, gap / closing + PAST_TIE_S)
        else:
            upper = min(upper, gap / closing)
    return lower if lower < upper else None


class PausedPlans:
    """The plans in flight that stopped between layers (and left stage 0 to newer plans), and
    how many plans each has waited through over all its pauses (bounded by `budget`)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._paused: set[int] = set()
        self._waited: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._paused)

    def __contains__(self, plan_id: int) -> bool:
        return plan_id in self._paused

    def within_budget(self, plan_id: int) -> bool:
        return self._waited.get(plan_id, 0) < self.budget

    def plan_issued(self) -> None:
        """Another plan was issued: each paused plan has waited through one more."""
        for plan_id in self._paused:
            self._waited[plan_id] += 1

    def pause(self, plan_id: int) -> None:
        self._paused.add(plan_id)
        self._waited.setdefault(plan_id, 0)

    def resume(self, plan_id: int, pause_again: bool) -> None:
        self._paused.remove(plan_id)
        if not pause_again:
            self._waited[plan_id] = self.budget

    def forget(self, plan_id: int) -> None:
        """The plan is done."""
        self._waited.pop(plan_id, None)


def newcomers_pause_time(
    plan: BatchPlan,
    table: RequestTable,
    policy: PriorityPolicy,
    cost: BatchCostModel,
    now: float,
    lookahead: float,
    max_batch_size: int,
    *,
    lead_guard: bool,
    prefix_wait_s: float,
    lone: bool = False,
) -> float | None:
    """When a request that arrived after `plan` was made, with prefill left, not in flight and
    able to start, first ranks ahead of every prefill in `plan` (`now` if it does already;
    None: none ever will, as things stand). Priorities are compared `lookahead` seconds ahead,
    as the scheduler ranks them, and the plan's prefills with the work it counted when it was
    made (from their chunks' start). With `lead_guard`, "ahead" also means past the lead
    guard of each of the plan's prefills (medha.scheduler.lead_guard), pair by pair. That
    is `schedule`'s rule for the newcomer against the plan's prefills; `schedule` also weighs
    the requests that were queued when the plan was made (and gives up the guard against more
    than MAX_CHALLENGERS), so where they differ this errs towards not pausing. A queued
    request that waits for a prefix a started prefill computes (`prefix_wait_s`:
    medha.scheduler.prefix_sharing) pauses nothing, and a newcomer must also rank ahead of
    the requests waiting for the plan's prefills (they lend them their priority). A `lone`
    plan (`ran_alone`) stops for any newcomer that can start, whatever it ranks: its budget
    assumed that nobody else was there."""
    incumbents = [
        (policy.key_terms(request, cost, seq.start), request.remaining_prefill_s(cost, seq.start))
        for seq in plan.seqs
        if seq.kind is SeqKind.PREFILL
        and (request := table.requests.get(seq.request_id)) is not None
        and not request.status.is_done
    ]
    if not incumbents:
        return None  # decodes alone: they come first anyway
    admits = len(table.running) < max_batch_size
    gate = SharedPrefixGate(table, cost, prefix_wait_s, policy.shares_prefixes_in_flight)
    waiting = gate.waiters(list(table.queued.values()))
    lent = [
        policy.key_terms(waiter, cost)
        for seq in plan.seqs
        if seq.kind is SeqKind.PREFILL
        for waiter in waiting.get(seq.request_id, ())
    ]
    earliest: float | None = None
    for request in (*table.prefilling.values(), *table.queued.values()):
        if request.arrival <= plan.created_at or request.in_flight or request.tokens_left <= 0:
            continue
        if request.status.is_queued and not (
            admits
            and not gate.holds(request)
            and table.layout.feasible_first_groups(request.known_tokens, table.pool, request)
        ):
            continue
        if lone:
            return now
        terms = policy.key_terms(request, cost)
        to_beat = [incumbent for incumbent, _ in incumbents] + lent
        if lead_guard:
            work = request.remaining_prefill_s(cost)
            to_beat += [
                challenger_terms(incumbent, incumbent_work, terms, work)
                for incumbent, incumbent_work in incumbents
            ]
        at = overtake_time(terms, to_beat, now + lookahead)
        if at is not None and (earliest is None or at < earliest):
            earliest = at
    if earliest is None:
        return None
    return now if earliest <= now + lookahead else earliest - lookahead


def ran_alone(plan: BatchPlan, config: SchedulerConfig) -> bool:
    """Whether `plan` is one prefill that took the budget of a prefill alone in the scheduler
    (SchedulerConfig.lone_batch_time), beyond any ordinary batch's."""
    ordinary = config.target_batch_time * (
        1.0 + max(config.chunk_tolerance, config.finish_tolerance)
    )
    return (
        config.lone_batch_time is not None
        and len(plan.seqs) == 1
        and plan.predicted_time > ordinary
    )
