"""Policy behaviour end to end (docs/scheduler.md, Policies): FCFS convoys, EDF starves then
convoys, SRPT starves long requests, LARS meets every deadline of the worked example and bounds
the wait of long requests."""

from __future__ import annotations

from tests.scheduler_support import Arrival, DriverResult, ToyCost, drive, make_scheduler

# Linear layers cost at least 20 ms per iteration (weights stream from memory), so a short
# prompt riding along with a late, attention-bound chunk of a long prompt is almost free:
# the multi-prefill batching (space sharing) of the Medha paper builds on.
ROOFLINE = ToyCost(linear_floor=0.02, iteration_budget=0.05)
LONG_PROMPT = 70_000  # ~10.6 s of chunked prefill on ROOFLINE: default deadline ~16 s
SHORT_PROMPT = 400
SHORT_DEADLINE = 0.5


def _worked_example(policy: str) -> tuple[DriverResult, list[Arrival]]:
    """A ~10 s long prompt at t=0, then bursts of 24 short prompts (0.5 s deadlines) every
    0.4 s from t=1 s to t=22 s.

    Margins (checked when written): EDF's long prompt is ~1.8 s late and 26 shorts miss behind
    it; with LARS the long prompt has ~1 s to spare and the slowest short ~90 ms."""
    arrivals = [Arrival("long", 0.0, LONG_PROMPT, 4)]
    burst_time, index = 1.0, 0
    while burst_time < 22.0:
        for _ in range(24):
            arrivals.append(Arrival(f"s{index}", burst_time, SHORT_PROMPT, 2, SHORT_DEADLINE))
            index += 1
        burst_time += 0.4
    scheduler = make_scheduler(
        ROOFLINE,
        policy=policy,
        target_batch_time=0.05,
        long_prefill_threshold=16_384,
        num_blocks=20_000,
    )
    return drive(scheduler, arrivals), arrivals[1:]


def test_worked_example_fcfs_makes_shorts_wait_behind_the_whole_long_prefill() -> None:
    result, shorts = _worked_example("fcfs")
    long_done = result.finished["long"].first_token_time
    assert long_done is not None
    during = [s.request_id for s in shorts if s.arrival < long_done - SHORT_DEADLINE]
    assert during
    assert not any(result.met(request_id) for request_id in during)


def test_worked_example_edf_starves_the_long_prompt_then_convoys_the_shorts() -> None:
    result, shorts = _worked_example("edf")
    long = result.finished["long"]
    assert not long.met_deadline  # starved by a stream of earlier short deadlines
    missed = [s for s in shorts if not result.met(s.request_id)]
    assert missed  # ...then it has the earliest deadline and blocks the shorts
    assert long.first_token_time is not None
    for short in missed:
        assert long.deadline_at - SHORT_DEADLINE <= short.arrival <= long.first_token_time


def test_worked_example_lars_meets_every_deadline() -> None:
    result, shorts = _worked_example("lars")
    assert result.met("long")
    assert all(result.met(short.request_id) for short in shorts)


def _steady_shorts_with_longs(policy: str, period: float) -> DriverResult:
    """Short prompts that each fill most of an iteration arrive every `period` seconds for
    20 s; three ~0.7 s long prompts arrive at 1, 5 and 9 s."""
    arrivals = [Arrival(f"long{i}", 1.0 + 4.0 * i, 20_000, 2) for i in range(3)]
    arrivals += [Arrival(f"s{i}", period * i, 2000, 2) for i in range(int(20 / period))]
    scheduler = make_scheduler(ToyCost(), policy=policy, num_blocks=20_000)
    return drive(scheduler, arrivals)


def test_srpt_starves_long_requests_while_a_saturating_short_stream_lasts() -> None:
    result = _steady_shorts_with_longs("srpt", period=0.05)
    for index in range(3):
        assert result.ttft(f"long{index}") > 10.0


def test_lars_keeps_long_requests_within_twice_their_deadline_where_srpt_does_not() -> None:
    lars = _steady_shorts_with_longs("lars", period=0.06)
    srpt = _steady_shorts_with_longs("srpt", period=0.06)
    for index in range(3):
        request_id = f"long{index}"
        deadline = lars.finished[request_id].deadline
        assert lars.ttft(request_id) <= 2 * deadline
        assert srpt.ttft(request_id) > 3 * deadline
