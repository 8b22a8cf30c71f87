"""SPP: micro-batches stream through the pipeline; chunks of one prompt follow each other
as soon as the previous chunk has left stage 0."""

from __future__ import annotations

import pytest

from tests.scheduler_support import Arrival, drive, make_scheduler


def test_a_new_micro_batch_needs_stage_0_free_and_fewer_than_pp_in_flight() -> None:
    scheduler = make_scheduler(pp_stages=2, target_batch_time=0.02)
    for index in range(4):
        scheduler.add_request(f"r{index}", 20_000, 2, arrival=0.0)
    first = scheduler.schedule(0.0)
    assert not first.is_empty
    assert scheduler.schedule(0.0).is_empty  # stage 0 still busy
    scheduler.on_stage0_done(first)
    second = scheduler.schedule(0.01)
    assert not second.is_empty
    scheduler.on_stage0_done(second)
    assert scheduler.schedule(0.02).is_empty  # two plans in flight = pp
    scheduler.on_step_done(first, 0.03)
    assert not scheduler.schedule(0.03).is_empty


def test_plans_must_finish_in_the_order_they_were_issued() -> None:
    scheduler = make_scheduler(pp_stages=2, target_batch_time=0.02)
    scheduler.add_request("long", 20_000, 2, arrival=0.0)
    first = scheduler.schedule(0.0)
    scheduler.on_stage0_done(first)
    second = scheduler.schedule(0.01)
    with pytest.raises(ValueError, match="before plan"):
        scheduler.on_step_done(second, 0.02)
    scheduler.on_step_done(first, 0.02)
    scheduler.on_step_done(second, 0.03)


def test_with_spp_the_next_chunk_enters_once_the_previous_one_left_stage_0() -> None:
    scheduler = make_scheduler(pp_stages=2, spp=True, target_batch_time=0.02)
    scheduler.add_request("long", 20_000, 2, arrival=0.0)
    first = scheduler.schedule(0.0)
    scheduler.on_stage0_done(first)
    second = scheduler.schedule(0.01)
    assert [seq.request_id for seq in second.seqs] == ["long"]
    assert second.seqs[0].start == first.seqs[0].end
    request = scheduler.get("long")
    assert request is not None
    assert (request.issued, request.stage0, request.computed) == (
        second.seqs[0].end,
        first.seqs[0].end,
        0,
    )
    scheduler.on_step_done(first, 0.02)
    assert request.computed == first.seqs[0].end


def test_without_spp_a_request_is_in_at_most_one_plan_in_flight() -> None:
    scheduler = make_scheduler(pp_stages=2, spp=False, target_batch_time=0.02)
    scheduler.add_request("long", 20_000, 2, arrival=0.0)
    first = scheduler.schedule(0.0)
    scheduler.on_stage0_done(first)
    assert scheduler.schedule(0.01).is_empty
    scheduler.add_request("other", 500, 2, arrival=0.01)
    second = scheduler.schedule(0.01)
    assert [seq.request_id for seq in second.seqs] == ["other"]


def test_a_decode_waits_for_its_previous_token_even_with_spp() -> None:
    scheduler = make_scheduler(pp_stages=2, spp=True)
    scheduler.add_request("r", 100, 5, arrival=0.0)
    prefill = scheduler.schedule(0.0)
    scheduler.on_stage0_done(prefill)
    assert scheduler.schedule(0.01).is_empty  # the first token is not sampled yet
    scheduler.on_step_done(prefill, 0.02)
    decode = scheduler.schedule(0.02)
    assert [(seq.request_id, seq.start) for seq in decode.seqs] == [("r", 100)]
    scheduler.on_stage0_done(decode)
    assert scheduler.schedule(0.03).is_empty


@pytest.mark.parametrize("pp", [2, 4])
def test_spp_cuts_a_long_prefills_time_to_first_token_nearly_linearly(pp: int) -> None:
    def ttft(stages: int, spp: bool) -> float:
        scheduler = make_scheduler(pp_stages=stages, spp=spp, target_batch_time=0.05)
        result = drive(scheduler, [Arrival("long", 0.0, 60_000, 1)])
        return result.ttft("long")

    alone = ttft(1, True)
    assert ttft(pp, True) < alone / pp * 1.3
    assert ttft(pp, False) == pytest.approx(alone, rel=0.05)  # no overlap without SPP


@pytest.mark.parametrize("spp", [True, False])
def test_pipelined_workloads_finish_everything_and_release_every_block(spp: bool) -> None:
    scheduler = make_scheduler(pp_stages=3, spp=spp, num_blocks=512, target_batch_time=0.03)
    arrivals = [Arrival(f"r{i}", 0.02 * i, 300 + 911 * (i % 5), 12) for i in range(20)]
    result = drive(scheduler, arrivals)
    assert len(result.finished) == 20
