"""Request lifecycle: admission checks, finishing, aborts in every state, stats, callbacks."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from medha.errors import InvalidRequestError, RequestTooLargeError
from medha.scheduler import RequestStatus, SchedulerConfig
from tests.scheduler_support import Arrival, drive, make_scheduler, step


def test_importing_the_scheduler_does_not_import_torch() -> None:
    code = "import sys, medha.scheduler; sys.exit('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert completed.returncode == 0, completed.stderr.decode()


def test_the_scheduler_never_reads_a_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the scheduler read the clock")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, no_clock)
    arrivals = [Arrival(f"r{i}", 0.1 * i, 500 + 300 * i, 5) for i in range(6)]
    result = drive(make_scheduler(policy="lars", pp_stages=2), arrivals)
    assert len(result.finished) == 6


def test_a_request_that_can_never_fit_is_rejected_not_queued() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=16)  # 128 tokens of KV
    with pytest.raises(RequestTooLargeError, match="129 tokens"):
        scheduler.add_request("big", 120, 9, arrival=0.0)
    scheduler.add_request("fits", 120, 8, arrival=0.0)
    assert scheduler.get("big") is None
    assert scheduler.stats().waiting == 1


def test_kvp_lets_a_request_span_groups_but_not_more_groups_than_exist() -> None:
    scheduler = make_scheduler(
        num_blocks=8, block_size=16, kvp_groups=2, max_tokens_per_kvp_group=128
    )
    scheduler.add_request("spans-two", 200, 56, arrival=0.0)
    with pytest.raises(RequestTooLargeError):
        scheduler.add_request("needs-three", 200, 57, arrival=0.0)


@pytest.mark.parametrize(
    ("prompt_len", "max_new_tokens", "arrival", "deadline"),
    [
        (0, 4, 0.0, None),
        (10, 0, 0.0, None),
        (10, 4, 0.0, 0.0),
        (10, 4, 0.0, math.inf),
        (10, 4, 0.0, math.nan),
        (10, 4, math.inf, None),
        (10, 4, math.nan, 1.0),
    ],
)
def test_malformed_requests_raise_invalid_request_error(
    prompt_len: int, max_new_tokens: int, arrival: float, deadline: float | None
) -> None:
    scheduler = make_scheduler()
    with pytest.raises(InvalidRequestError):
        scheduler.add_request("r", prompt_len, max_new_tokens, arrival, deadline)
    with pytest.raises(ValueError):  # InvalidRequestError is a ValueError too
        scheduler.add_request("r", prompt_len, max_new_tokens, arrival, deadline)
    assert not scheduler.has_work


def test_a_duplicate_request_id_is_rejected() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 10, 4, 0.0)
    with pytest.raises(InvalidRequestError, match="already"):
        scheduler.add_request("r", 10, 4, 0.0)


def test_requests_finish_at_max_new_tokens_and_record_their_first_token_time() -> None:
    scheduler = make_scheduler()
    request = scheduler.add_request("r", 100, 3, arrival=0.6)
    finished = []
    for now in (1.0, 2.0, 3.0):
        _, done = step(scheduler, now)
        finished += done
    assert finished == [request]
    assert request.status is RequestStatus.FINISHED
    assert request.generated == 3
    assert request.first_token_time == 1.0 and request.finish_time == 3.0
    assert request.ttft == pytest.approx(0.4)
    assert request.met_deadline  # default deadline: the 0.5 s floor
    assert scheduler.get("r") is None
    assert scheduler.stats().free_blocks == scheduler.stats().total_blocks


def test_the_caller_can_finish_a_request_early_with_the_token_it_sampled() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 100, 50, arrival=0.0)
    step(scheduler, 1.0)
    _, done = step(scheduler, 2.0, finished={"r"})
    assert [request.request_id for request in done] == ["r"]
    assert done[0].generated == 2
    plan, _ = step(scheduler, 3.0)
    assert plan.released == ("r",)
    assert plan.is_empty


def test_abort_of_a_waiting_request_removes_it_without_touching_blocks() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 100, 4, arrival=0.0)
    assert scheduler.abort("r")
    assert not scheduler.abort("r")
    assert not scheduler.abort("unknown")
    plan, _ = step(scheduler, 1.0)
    assert plan.is_empty and plan.released == ()
    stats = scheduler.stats()
    assert (stats.waiting, stats.aborted) == (0, 1)


def test_abort_mid_prefill_frees_the_whole_reservation_at_once() -> None:
    scheduler = make_scheduler(target_batch_time=0.02)
    scheduler.add_request("r", 20_000, 4, arrival=0.0)
    plan, _ = step(scheduler, 0.0)
    assert plan.seqs[0].end < 20_000  # still prefilling
    assert scheduler.stats().free_blocks[0] < scheduler.stats().total_blocks[0]
    assert scheduler.abort("r")
    assert scheduler.stats().free_blocks == scheduler.stats().total_blocks
    plan, _ = step(scheduler, 1.0)
    assert plan.released == ("r",)


def test_abort_while_in_flight_ignores_the_results_and_frees_blocks_exactly_once() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 100, 4, arrival=0.0)
    scheduler.add_request("other", 100, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    assert scheduler.abort("r")
    used = scheduler.stats().total_blocks[0] - scheduler.stats().free_blocks[0]
    assert used == 14  # both reservations are still held: the step writes r's KV
    scheduler.on_stage0_done(plan)
    done = scheduler.on_step_done(plan, 1.0)
    assert done == []
    assert scheduler.get("r") is None
    assert scheduler.stats().total_blocks[0] - scheduler.stats().free_blocks[0] == 7
    assert not scheduler.abort("r")
    next_plan, _ = step(scheduler, 1.0)
    assert next_plan.released == ("r",)
    assert [seq.request_id for seq in next_plan.seqs] == ["other"]


def test_abort_of_a_decoding_request_frees_its_blocks() -> None:
    scheduler = make_scheduler()
    scheduler.add_request("r", 100, 10, arrival=0.0)
    step(scheduler, 0.0)
    step(scheduler, 1.0)
    assert scheduler.get("r").status is RequestStatus.DECODING  # type: ignore[union-attr]
    assert scheduler.abort("r")
    assert scheduler.stats().free_blocks == scheduler.stats().total_blocks


def test_stats_count_queues_blocks_and_plans_in_flight() -> None:
    scheduler = make_scheduler(num_blocks=100, max_batch_size=2, pp_stages=2)
    for index in range(4):
        scheduler.add_request(f"r{index}", 160, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    stats = scheduler.stats()
    assert (stats.waiting, stats.prefilling, stats.decoding, stats.running) == (2, 2, 0, 2)
    assert stats.free_blocks == (80,) and stats.total_blocks == (100,)
    assert stats.plans_in_flight == 1 and stats.stage0_busy
    scheduler.on_stage0_done(plan)
    scheduler.on_step_done(plan, 1.0)
    stats = scheduler.stats()
    assert (stats.decoding, stats.plans_in_flight, stats.stage0_busy) == (2, 0, False)


def test_reporting_an_unknown_plan_is_an_error_and_empty_plans_are_no_ops() -> None:
    scheduler = make_scheduler()
    empty = scheduler.schedule(0.0)
    assert empty.is_empty
    scheduler.on_stage0_done(empty)
    assert scheduler.on_step_done(empty, 0.0) == []
    scheduler.add_request("r", 10, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    scheduler.on_step_done(plan, 1.0)  # implies stage 0 done
    with pytest.raises(ValueError, match="not in flight"):
        scheduler.on_step_done(plan, 1.0)
    with pytest.raises(ValueError, match="stage 0"):
        scheduler.on_stage0_done(plan)


def test_config_rejects_inconsistent_chunk_and_kvp_settings() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(min_chunk=64, max_chunk=32)
    with pytest.raises(ValueError):
        SchedulerConfig(max_chunk=1000)  # not a multiple of 32
    with pytest.raises(ValueError):
        SchedulerConfig(max_tokens_per_kvp_group=1000, block_size=16)
    with pytest.raises(ValueError):
        SchedulerConfig(policy="round-robin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SchedulerConfig(target_batch_time=0)
