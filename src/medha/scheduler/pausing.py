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

KeyTerms = tuple[float, float]
"""(base, rate): the key at ranking time T is base - rate x T (smaller goes first)."""

# A newer request loses ties (ties go to arrival order), so it is ahead only strictly after the
# moment the keys meet; the moment returned is this much later, so that a check made then holds.
PAST_TIE_S = 1e-4


def overtake_time(newcomer: KeyTerms, incumbents: Sequence[KeyTerms], now: float) -> float | None:
    """The earliest ranking time >= `now` at which `newcomer`'s key is below every one of
    `incumbents`' keys; None if that never happens (or `incumbents` is empty)."""
    if not incumbents:
        return None
    base, rate = newcomer
    lower, upper = now, math.inf
    for other_base, other_rate in incumbents:
        # newcomer ahead at T  <=>  (base - other_base) < (rate - other_rate) x T
        gap, closing = base - other_base, rate - other_rate
        if closing == 0:
            if gap >= 0:
                return None
        elif closing > 0:
            lower = max(lower, gap / closing + PAST_TIE_S)
        else:
            upper = min(upper, gap / closing)
    return lower if lower < upper else None
