"""The lead guard: a started prefill is preempted only when that helps the pair.

Slack-based keys thrash. Serving a prefill cuts its remaining work, so its slack stops falling
while every waiting request's keeps falling; two chats that arrive together then take turns,
chunk by chunk, and BOTH get their first token at the end, the earlier one twice as late as
if it had simply gone first. Real-time scheduling knows this of least-laxity-first (it meets
the same deadlines as EDF, with far more context switches) and fixes it by letting the
running task keep the processor while switching would not help (Oh & Yang's modified LLF).

The rule here, for keys that fall at rate r over time (PriorityPolicy: key(t) = base - r t):
when challenger C ranks ahead of started prefill I, compare the two orders by the worse key
each leaves. If I goes first, C starts w_I later, at key_C(t + w_I); if C goes first, I starts
at key_I(t + w_C). I keeps the lead when

    key_I(t + w_C) <= key_C(t + w_I)

that is, when I would lose at least as much by waiting for C as C loses by waiting for I.
Under LARS that means, between two chats, the earlier deadline goes first (EDF, which
minimises the pair's worst lateness); a chat started before a document became urgent
finishes first (its w is tiny against the document's d); and a document keeps the lead
over a newly arrived chat only on its last few chunks, once it is already late: a chat's key
falls at 1/d_chat, so waiting a whole document costs it far more. The guard never moves a
challenger ahead of where the policy ranks it, so LARS's arbitration between requests that
have not started, and its protection of long requests from starvation, are untouched. Keys
that do not move with time (FCFS, EDF, SRPT) never pass the test: the guard is a no-op there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.scheduler.cost import BatchCostModel
    from medha.scheduler.request import SchedRequest

KeyTerms = tuple[float, float]
"""(base, rate): the key at ranking time T is base - rate x T (smaller goes first)."""

Ranked = tuple[float, int, "SchedRequest"]


def keeps_lead(
    incumbent: KeyTerms,
    incumbent_work: float,
    challenger: KeyTerms,
    challenger_work: float,
    at: float,
) -> bool:
    """Whether a started prefill (key terms, remaining seconds of work) should go before a
    challenger ranked ahead of it at time `at`: key_I(at + w_C) <= key_C(at + w_I)."""
    base_i, rate_i = incumbent
    base_c, rate_c = challenger
    return base_i - rate_i * (at + challenger_work) <= base_c - rate_c * (at + incumbent_work)


def challenger_terms(
    incumbent: KeyTerms, incumbent_work: float, challenger: KeyTerms, challenger_work: float
) -> KeyTerms:
    """The guard as one more key to beat: the challenger overtakes the incumbent at T only if
    its key is below this one's too (key_C(T + w_I) < key_I(T + w_C), rearranged)."""
    base_i, rate_i = incumbent
    _, rate_c = challenger
    return base_i - rate_i * challenger_work + rate_c * incumbent_work, rate_i


def promote_guarded(
    started: list[Ranked],
    queued: Sequence[SchedRequest],
    queued_keys: Sequence[float],
    cost: BatchCostModel,
    at: float,
) -> None:
    """Move to the front of `started` (key -inf, in place) the best-ranked started prefill that
    keeps the lead over every candidate ranked ahead of it, if any; the others keep their
    places. One at most: the front is one place."""
    started.sort(key=lambda item: item[:2])
    for index, (key, order, incumbent) in enumerate(started):
        challengers = [request for _, _, request in started[:index]]
        challengers += [
            request
            for request, queued_key in zip(queued, queued_keys, strict=True)
            if (queued_key, request.order) < (key, order)
        ]
        if not challengers:
            return  # it leads already, and so does nobody after it
        work = incumbent.remaining_prefill_s(cost)
        terms = (incumbent.key_base, incumbent.key_rate)
        if all(
            keeps_lead(
                terms,
                work,
                (challenger.key_base, challenger.key_rate),
                challenger.remaining_prefill_s(cost),
                at,
            )
            for challenger in challengers
        ):
            started[index] = (-math.inf, order, incumbent)
            return
