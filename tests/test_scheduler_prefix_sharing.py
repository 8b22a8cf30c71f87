"""Requests that share a prefix a started prefill is computing wait for it and take it from the
cache, instead of computing it too: one after another, several in the same pass, and not once
the computing request is aborted or has passed the shared part."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from medha.scheduler import Scheduler, SchedulerConfig
from medha.scheduler.prefix_cache import block_hashes
from tests.scheduler_support import Arrival, drive_random_workload, make_scheduler, step
from tests.test_scheduler_prefix_cache import PROPERTY_SETTINGS, configs, drawn_arrival

DOC = [random.Random(7).randrange(1000) for _ in range(2000)]


def _question(seed: int) -> list[int]:
    return [*DOC, *[random.Random(seed).randrange(1000) for _ in range(30)]]


def _add(
    scheduler: Scheduler,
    request_id: str,
    prompt: list[int],
    now: float,
    deadline: float | None = None,
    max_new_tokens: int = 2,
    scores_prompt: bool = False,
) -> None:
    hashes = block_hashes(prompt, 16)
    scheduler.add_request(
        request_id,
        len(prompt),
        max_new_tokens,
        now,
        deadline,
        block_hashes=hashes,
        scores_prompt=scores_prompt,
    )


def _started(scheduler: Scheduler, request_id: str) -> bool:
    request = scheduler.get(request_id)
    return request is not None and bool(request.groups)


def test_a_request_waits_for_the_prefix_a_started_prefill_computes_then_takes_it() -> None:
    scheduler = make_scheduler(target_batch_time=0.01)  # chunks of a few hundred tokens
    _add(scheduler, "a", _question(1), 0.0)
    step(scheduler, 0.0)
    # However urgent: starting now, it would compute the document A is computing.
    _add(scheduler, "b", _question(2), 0.01, deadline=0.01)
    now, chunks_of_a_while_b_waits = 0.01, 0
    while True:
        plan, _ = step(scheduler, now)
        now += 0.02
        b_seqs = [seq for seq in plan.seqs if seq.request_id == "b"]
        if b_seqs:
            break
        assert [seq.request_id for seq in plan.seqs] == ["a"]
        chunks_of_a_while_b_waits += 1
    assert chunks_of_a_while_b_waits > 2
    # B started once A had computed the whole document: its 125 blocks came from the cache.
    assert b_seqs[0].start == 2000
    assert scheduler.stats().prefix_hit_blocks == 125


def test_a_request_that_does_not_read_the_cache_waits_for_nobody() -> None:
    # It would compute the shared prefix anyway (it scores its prompt): waiting gains nothing.
    scheduler = make_scheduler(target_batch_time=0.01)
    _add(scheduler, "a", _question(1), 0.0)
    step(scheduler, 0.0)
    _add(scheduler, "b", _question(2), 0.01, deadline=0.01, scores_prompt=True)
    plan, _ = step(scheduler, 0.01)
    assert [(seq.request_id, seq.start) for seq in plan.seqs if seq.request_id == "b"] == [("b", 0)]


def test_requests_arriving_together_compute_their_shared_prefix_once() -> None:
    # A 20K-token document (~0.6 s alone) and a budget with room for more than one chunk.
    scheduler = make_scheduler(target_batch_time=0.3, max_batch_size=8)
    document = [random.Random(8).randrange(1000) for _ in range(20_000)]
    for index in range(4):
        question = [*document, *[random.Random(index).randrange(1000) for _ in range(30)]]
        _add(scheduler, f"q{index}", question, 0.0)
    plan, _ = step(scheduler, 0.0)
    assert len(plan.seqs) == 1  # one of them computes the document; the others wait
    first_starts = {plan.seqs[0].request_id: 0}
    now = 0.0
    while scheduler.has_work:
        now += 0.3
        plan, _ = step(scheduler, now)
        for seq in plan.seqs:
            first_starts.setdefault(seq.request_id, seq.start)
    waiters = {rid: start for rid, start in first_starts.items() if start > 0}
    assert len(waiters) == 3
    for start in waiters.values():
        # They waited until what was left of the document would take less than an iteration
        # to compute themselves (and took the rest from the cache).
        assert scheduler.cost.remaining_prefill_time(start, 20_000) < 0.3
    assert scheduler.stats().prefix_hit_blocks == sum(waiters.values()) // 16
    assert scheduler.stats().finished == 4


def test_a_waiting_request_starts_when_the_prefill_it_waits_for_is_aborted() -> None:
    scheduler = make_scheduler(target_batch_time=0.02)
    _add(scheduler, "a", _question(1), 0.0)
    step(scheduler, 0.0)
    _add(scheduler, "b", _question(2), 0.01)
    step(scheduler, 0.01)
    assert not _started(scheduler, "b")
    a = scheduler.get("a")
    assert a is not None
    done = a.computed
    scheduler.abort("a")
    plan, _ = step(scheduler, 0.02)
    (seq,) = plan.seqs
    assert seq.request_id == "b" and seq.start == done  # from what A had computed


def test_a_request_that_shares_only_a_computed_prefix_does_not_wait() -> None:
    scheduler = make_scheduler(target_batch_time=0.02)
    _add(scheduler, "a", _question(1), 0.0)
    step(scheduler, 0.0)
    other = [*DOC[:32], *[random.Random(9).randrange(1000) for _ in range(200)]]
    _add(scheduler, "b", other, 0.01, deadline=0.01)  # urgent: it goes first
    plan, _ = step(scheduler, 0.01)
    (seq,) = [seq for seq in plan.seqs if seq.request_id == "b"]
    assert seq.start == 32  # the two shared blocks, computed by A's first chunk


def test_a_plan_is_not_paused_for_a_newcomer_that_waits_for_its_prefix() -> None:
    scheduler = make_scheduler(target_batch_time=0.02)
    _add(scheduler, "a", _question(1), 0.0)
    step(scheduler, 0.0)
    plan = scheduler.schedule(0.02)
    _add(scheduler, "b", _question(2), 0.021, deadline=5.0)
    assert scheduler.pause_time(plan, 0.021) is None
    chat = [random.Random(5).randrange(1000) for _ in range(20)]
    _add(scheduler, "chat", chat, 0.021, deadline=0.01)
    assert scheduler.pause_time(plan, 0.021) is not None  # for the chat


def test_a_plan_computing_an_urgent_requests_prefix_pauses_only_for_one_more_urgent() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)
    document = [random.Random(8).randrange(1000) for _ in range(20_000)]
    _add(scheduler, "a", [*document, 1, 2, 3], 0.0, deadline=1000.0)  # all the slack there is
    step(scheduler, 0.0)
    _add(scheduler, "w", [*document, 4, 5, 6], 0.01, deadline=0.6)  # urgent; waits for A
    plan = scheduler.schedule(0.02)
    other = [random.Random(9).randrange(1000) for _ in range(3000)]
    _add(scheduler, "n", other, 0.021, deadline=3.0)  # more urgent than A, not than W
    assert scheduler.pause_time(plan, 0.021) is None
    _add(scheduler, "m", other[:100], 0.021, deadline=0.02)  # more urgent than W
    assert scheduler.pause_time(plan, 0.021) == 0.021


def test_the_prefill_an_urgent_request_waits_for_inherits_its_priority() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)  # ~2,000 fresh tokens per iteration
    document = [random.Random(8).randrange(1000) for _ in range(20_000)]
    _add(scheduler, "a", [*document, 1, 2, 3], 0.0, deadline=1000.0)  # all the slack there is
    step(scheduler, 0.0)
    other = [random.Random(9).randrange(1000) for _ in range(20_000)]
    _add(scheduler, "c", other, 0.01, deadline=5.0)
    plan, _ = step(scheduler, 0.01)
    assert plan.seqs[0].request_id == "c"  # more urgent than A: it takes the budget first
    _add(scheduler, "b", [*document, 4, 5, 6], 0.02, deadline=0.6)  # waits for A's document
    plan, _ = step(scheduler, 0.02)
    assert "b" not in {seq.request_id for seq in plan.seqs}
    assert plan.seqs[0].request_id == "a"  # ranked as urgently as B now


@st.composite
def bursts(draw: st.DrawFn) -> list[Arrival]:
    # Requests over one long document, sent within 0.1 s, some urgent: they wait for each
    # other's prefixes (and lend their priority), are aborted or stop early meanwhile.
    document = [random.Random(1).randrange(1000) for _ in range(draw(st.integers(500, 2400)))]
    arrivals = []
    for index in range(draw(st.integers(2, 12))):
        shared = draw(st.integers(0, len(document)))
        prompt = [*document[:shared], *[random.Random(index).randrange(1000) for _ in range(7)]]
        outputs = draw(st.integers(1, 120))
        conversation = [*prompt, *[random.Random(50 + index).randrange(1000)] * outputs]
        arrival = draw(st.floats(0.0, 0.1))
        deadline = draw(st.none() | st.floats(0.01, 5.0))
        arrivals.append(
            drawn_arrival(draw, f"r{index}", arrival, prompt, conversation, 0.5, deadline=deadline)
        )
    return arrivals


@PROPERTY_SETTINGS
@given(
    config=configs(num_blocks=(150, 600), limits=(512, 1024), budgets=(0.005, 0.01, 0.02)),
    arrivals=bursts(),
)
def test_bursts_over_one_document_finish_without_a_stall_or_a_leak(
    config: SchedulerConfig, arrivals: list[Arrival]
) -> None:
    # The driver asserts the scheduler never stalls with work left (a request waiting for a
    # prefix nobody computes any more would), and the checker every block's content.
    drive_random_workload(config, arrivals)


def test_a_decode_short_of_memory_preempts_a_prefill_nobody_waits_for_first() -> None:
    # Memory for two 20K-token prefills and one chat: the chat's decode needs a block when
    # its first one is full, and one of the partial prefills must go.
    scheduler = make_scheduler(target_batch_time=0.05, num_blocks=1251 + 1251 + 1)
    document = [random.Random(8).randrange(1000) for _ in range(20_000)]
    other = [random.Random(9).randrange(1000) for _ in range(20_000)]
    _add(scheduler, "a", [*document, 1, 2, 3], 0.0, deadline=1000.0)  # all the slack there is
    step(scheduler, 0.0)
    _add(scheduler, "p", [*other, 1, 2, 3], 0.05, deadline=100.0)
    _add(scheduler, "chat", [5] * 8, 0.05, deadline=0.1, max_new_tokens=20)
    step(scheduler, 0.05)
    assert {"a", "p"} <= set(scheduler.table.prefilling) and not scheduler.stats().free_blocks[0]
    _add(scheduler, "w", [*document, 4, 5, 6], 0.1, deadline=0.6)  # urgent; waits for A
    now, preempted = 0.1, ()
    for _ in range(20):
        plan, _ = step(scheduler, now)
        now += 0.05
        if plan.preempted:
            preempted = plan.preempted
            break
    # A is the least urgent by its own deadline, but W lends it its urgency.
    assert preempted == ("p",)
