"""Paged KV memory: bulk reservation, decode growth, preemption by recompute."""

from __future__ import annotations

from medha.scheduler import RequestStatus, SeqKind
from tests.scheduler_support import Arrival, drive, make_scheduler, step


def test_the_whole_prompt_is_reserved_when_its_first_chunk_is_scheduled() -> None:
    scheduler = make_scheduler(target_batch_time=0.02)
    scheduler.add_request("r", 10_000, 4, arrival=0.0)
    plan, _ = step(scheduler, 0.0)
    (seq,) = plan.seqs
    assert seq.end < 10_000
    ((group, blocks),) = seq.new_blocks
    assert group == 0 and len(blocks) == 625  # ceil(10000 / 16)
    plan, _ = step(scheduler, 1.0)
    assert plan.seqs[0].start == seq.end and plan.seqs[0].new_blocks == ()


def test_a_decode_gets_one_new_block_exactly_when_it_crosses_a_block_boundary() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 16, 40, arrival=0.0)
    prefill, _ = step(scheduler, 0.0)
    assert len(prefill.seqs[0].new_blocks[0][1]) == 1
    grown = []
    for now in range(1, 30):
        plan, _ = step(scheduler, float(now))
        (decode,) = plan.seqs
        assert decode.kind is SeqKind.DECODE and decode.q_tokens == 1
        if decode.new_blocks:
            grown.append(decode.start)
    assert grown == [16, 32]  # positions 16 and 32 open blocks 2 and 3


def test_a_decode_that_needs_a_block_evicts_the_partial_prefill_which_recomputes() -> None:
    # 10 blocks of 16 tokens. "a" decodes and soon needs a third block; "b" holds 8 blocks
    # for a prefill that has only started (fixed 64-token budget per iteration).
    scheduler = make_scheduler(policy="fcfs-chunked", fixed_chunk=64, num_blocks=10)
    scheduler.add_request("a", 32, 100, arrival=0.0)
    scheduler.add_request("b", 128, 4, arrival=0.1)
    first, _ = step(scheduler, 0.1)
    assert [(s.request_id, s.q_tokens) for s in first.seqs] == [("a", 32), ("b", 32)]
    assert scheduler.stats().free_blocks == (0,)
    second, _ = step(scheduler, 0.2)
    assert second.preempted == ("b",)
    assert [(s.request_id, s.kind) for s in second.seqs] == [("a", SeqKind.DECODE)]
    victim = scheduler.get("b")
    assert victim is not None and victim.status is RequestStatus.PREEMPTED
    assert (victim.issued, victim.computed, victim.groups) == (0, 0, ())
    stats = scheduler.stats()
    assert (stats.preempted, stats.preemptions) == (1, 1)
    result = drive(scheduler, [], now=0.3)
    assert set(result.finished) == {"a", "b"}
    assert result.chunks_of("b")[0][0] == 0  # recomputed from scratch


def test_a_preempted_request_aborted_while_queued_is_still_released_to_the_stages() -> None:
    # The stages keep a preempted request's sampling state (its seeded random stream goes on
    # after the recompute), so they must hear when it ends, even though it holds no blocks.
    scheduler = make_scheduler(policy="fcfs-chunked", fixed_chunk=64, num_blocks=10)
    scheduler.add_request("a", 32, 100, arrival=0.0)
    scheduler.add_request("b", 128, 4, arrival=0.1)
    step(scheduler, 0.1)
    second, _ = step(scheduler, 0.2)
    assert second.preempted == ("b",)
    assert scheduler.abort("b")
    third, _ = step(scheduler, 0.3)
    assert third.released == ("b",)


def test_when_no_prefill_can_be_evicted_the_newest_decode_goes_and_keeps_its_tokens() -> None:
    scheduler = make_scheduler(num_blocks=4)  # 64 tokens
    scheduler.add_request("old", 16, 40, arrival=0.0)
    scheduler.add_request("new", 16, 40, arrival=0.1)
    preempted_at = None
    for now in range(40):
        plan, _ = step(scheduler, float(now))
        if plan.preempted:
            preempted_at = now
            break
    assert plan.preempted == ("new",)
    assert [s.request_id for s in plan.seqs] == ["old"]
    new = scheduler.get("new")
    assert new is not None and new.generated > 0
    generated = new.generated
    result = drive(scheduler, [], now=40.0)
    assert preempted_at is not None
    # Recompute prefills everything known (prompt + sampled tokens), then samples the next.
    first_chunk_after = result.chunks_of("new")[0]
    assert first_chunk_after[0] == 0
    assert result.chunks_of("new")[-1][1] == 16 + generated
    assert result.finished["new"].generated == 40
    assert result.finished["new"].num_preemptions == 1


def test_a_request_waiting_for_memory_is_not_overtaken_by_later_ones() -> None:
    scheduler = make_scheduler(policy="fcfs", num_blocks=20)  # 320 tokens
    arrivals = [
        Arrival("holder", 0.0, 100, 150),  # 250 tokens -> up to 16 blocks
        Arrival("big", 0.1, 200, 4),  # 13 blocks: must wait for the holder
        Arrival("small", 0.2, 16, 4),  # 2 blocks: would fit now, but comes later
    ]
    result = drive(scheduler, arrivals)
    big, small = result.finished["big"], result.finished["small"]
    assert big.first_scheduled_time is not None and small.first_scheduled_time is not None
    assert big.first_scheduled_time <= small.first_scheduled_time


def test_memory_pressure_across_many_requests_leaks_nothing() -> None:
    scheduler = make_scheduler(policy="lars", num_blocks=64, target_batch_time=0.03)
    arrivals = [Arrival(f"r{i}", 0.02 * i, 100 + 30 * i, 30 + i) for i in range(25)]
    result = drive(scheduler, arrivals)  # drive() asserts every block is free at the end
    assert len(result.finished) == 25
    assert scheduler.stats().preemptions > 0


def test_a_scored_prompt_recomputed_after_preemption_is_charged_only_rows_not_scored() -> None:
    # As above, "b" scoring its prompt (prompt_logprobs): its first chunk ran the LM head on its
    # 32 rows. The engine does not score them twice, so its recompute is charged the head only
    # from position 32 on (and the one row every chunk is charged before that).
    scheduler = make_scheduler(policy="fcfs-chunked", fixed_chunk=64, num_blocks=10)
    scheduler.add_request("a", 32, 100, arrival=0.0)
    scheduler.add_request("b", 128, 4, arrival=0.1, scores_prompt=True)
    first, _ = step(scheduler, 0.1)
    assert [(s.request_id, s.q_tokens, s.head_rows) for s in first.seqs] == [
        ("a", 32, 1),
        ("b", 32, 32),
    ]
    second, _ = step(scheduler, 0.2)
    assert second.preempted == ("b",)
    result = drive(scheduler, [], now=0.3)
    recompute = [
        (seq.start, seq.end, seq.head_rows)
        for plan in result.plans
        for seq in plan.seqs
        if seq.request_id == "b" and seq.kind is SeqKind.PREFILL
    ]
    assert recompute == [(0, 64, 32), (64, 128, 64)]
