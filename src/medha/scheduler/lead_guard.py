"""The lead guard: a started prefill is preempted only when that helps the pair.

Slack-based keys thrash. Serving a prefill cuts its remaining work, so its slack stops falling
while every waiting request's keeps falling; two chats that arrive together then take turns,
chunk by chunk, and both get their first token at the end, the earlier one up to twice as
late as had it simply gone first. Real-time scheduling knows this of least-laxity-first (it
meets the same deadlines as EDF, with far more context switches) and fixes it by letting the
running task keep the processor while switching would not help (Oh & Yang's modified LLF).

The rule, for keys that fall at rate r over time (PriorityPolicy: key(t) = base - r t): when
challenger C ranks ahead of started prefill I, compare the two orders by the worse key each
leaves. If I goes first, C starts w_I later, at key_C(t + w_I); if C goes first, I starts at
key_I(t + w_C). I keeps the lead when

    key_I(t + w_C) <= key_C(t + w_I)

that is, when I would lose at least as much by waiting for C as C loses by waiting for I.

Under LARS a request's key at its start is its relative slack at the end of its prefill, so
this picks the order with the smaller worse relative lateness (the two-job exchange argument
behind Lawler's rule). Between two chats with the same d (short chats on the min_deadline
floor, or two of one length) that is EDF. A chat started before a document became urgent
finishes first: the document loses w_chat / d_doc by waiting, the chat far more. Where a
document's key and a newly arrived chat's cross, the document keeps the lead only while
w_doc x d_doc <= w_chat x d_chat (for a 0.3 s chat due in 0.45 s against a 30 s deadline, the
document's last 4.5 ms of work); otherwise the chat cuts in when LARS says. The guard never
moves a challenger ahead of where LARS ranks it, which requests start is still LARS's choice,
and each hold lasts at most the incumbent's remaining work. LARS only
(PriorityPolicy.lead_guard): the baselines keep the order their definitions give.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.scheduler.cost import BatchCostModel
    from medha.scheduler.ranking import CandidateOrder

KeyTerms = tuple[float, float]
"""(base, rate): the key at ranking time T is base - rate x T (smaller goes first)."""


TIE_TOLERANCE = 1e-9
"""Keys this close (relative to their size) are a tie. The two sides of the rule come from
differently cached terms: two chats that arrive together with one d tie exactly, and rounding
alone (0.7772 against 0.7771999999999999) would otherwise hand the lead back and forth."""


def keeps_lead(
    incumbent: KeyTerms,
    incumbent_work: float,
    challenger: KeyTerms,
    challenger_work: float,
    at: float,
    ties_keep: bool = True,
) -> bool:
    """Whether a started prefill (key terms, remaining seconds of work) should go before a
    challenger ranked ahead of it at time `at`: key_I(at + w_C) <= key_C(at + w_I). A tie keeps
    the lead where `ties_keep`, else (a challenger that started too, with an equal claim to
    it) leaves the challenger ahead."""
    base_i, rate_i = incumbent
    base_c, rate_c = challenger
    waits = base_i - rate_i * (at + challenger_work)
    makes_wait = base_c - rate_c * (at + incumbent_work)
    tolerance = TIE_TOLERANCE * max(1.0, abs(waits), abs(makes_wait))
    if ties_keep:
        return waits <= makes_wait + tolerance
    return waits < makes_wait - tolerance


def challenger_terms(
    incumbent: KeyTerms, incumbent_work: float, challenger: KeyTerms, challenger_work: float
) -> KeyTerms:
    """The guard as one more key to beat: the challenger overtakes the incumbent at T only if
    its key is below this one's too (key_C(T + w_I) < key_I(T + w_C), rearranged)."""
    base_i, rate_i = incumbent
    _, rate_c = challenger
    return base_i - rate_i * challenger_work + rate_c * incumbent_work, rate_i


MAX_CHALLENGERS = 16
"""A started prefill holds off at most this many requests ranked ahead of it: the check costs
one comparison each per iteration, and a crowd that far ahead is LARS's call, not the guard's."""


def promote_guarded(candidates: CandidateOrder, cost: BatchCostModel, at: float) -> None:
    """Put first the best-ranked started prefill that keeps the lead over every candidate
    ranked ahead of it (at most MAX_CHALLENGERS of them) and over every other started
    prefill, if any; the others keep their places. One at most: the front is one place.

    Between two started prefills the rule decides whatever their ranks: the one it favours
    stays favoured while it runs (serving I moves t + w_I not at all, so neither side of the
    rule moves), where the LARS rank flips with every chunk (a chat that cut into a document
    keeps going while the document's key falls below its own). A tie between two started
    prefills (twins: one deadline and one d) goes to the earlier arrival, which does not move
    either. No started prefill that beats all the others (the rule is not transitive): the
    ranked order stands."""
    # The best-ranked started prefills only: the checks are pairwise among them.
    started = candidates.started()[: MAX_CHALLENGERS + 1]
    work = {id(request): request.remaining_prefill_s(cost) for _, _, request in started}
    for key, order, incumbent in started:
        challengers = candidates.ahead_of(key, order, MAX_CHALLENGERS + 1)
        if len(challengers) > MAX_CHALLENGERS:
            return  # and more still are ahead of the ones after it
        ahead = {id(request) for request in challengers}
        others = [request for _, _, request in started if request is not incumbent]
        rivals = [*challengers, *(request for request in others if id(request) not in ahead)]
        if not rivals:
            return  # alone: it leads already
        others_ids = {id(request) for request in others}
        terms = (incumbent.key_base, incumbent.key_rate)
        if all(
            keeps_lead(
                terms,
                work[id(incumbent)],
                (rival.key_base, rival.key_rate),
                work[id(rival)] if id(rival) in work else rival.remaining_prefill_s(cost),
                at,
                # A queued challenger loses ties; a started one, to the earlier arrival.
                ties_keep=id(rival) not in others_ids or incumbent.order < rival.order,
            )
            for rival in rivals
        ):
            if challengers:
                candidates.promote(incumbent)
            return
