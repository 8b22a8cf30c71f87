"""OnlineTimeScale: the cost model's batch times follow the executor's measured speed."""

from __future__ import annotations

import math

import pytest

from medha.perf import CPU, SMOLLM2_135M, OnlineTimeScale, RooflineCostModel
from medha.scheduler import RequestStatus, Scheduler, SchedulerConfig
from medha.scheduler.cost import SeqShape

BATCH = [SeqShape(64, 2_000), SeqShape(1, 300), SeqShape(1, 900)]


def cpu_cost() -> RooflineCostModel:
    return RooflineCostModel(SMOLLM2_135M, CPU, dtype_bytes=4)


def test_the_scale_converges_to_how_much_slower_the_executor_runs() -> None:
    cost = cpu_cost()
    calibrated = cost.batch_time(BATCH)
    tracker = OnlineTimeScale(cost, weight=0.1)
    for _ in range(100):
        tracker.observe(cost.batch_time(BATCH), 1.3 * calibrated)
    assert cost.time_scale == pytest.approx(1.3, rel=1e-3)
    assert cost.batch_time(BATCH) == pytest.approx(1.3 * calibrated, rel=1e-3)
    assert cost.stage_time(BATCH) == pytest.approx(cost.batch_time(BATCH))
    pricer = cost.batch_pricer()
    for seq in BATCH:
        pricer.add(seq)
    assert pricer.time() == pytest.approx(cost.batch_time(BATCH))
    assert tracker.observations == 100


def test_prefill_predictions_follow_the_scale_in_steps_and_the_breakdown_stays() -> None:
    cost = cpu_cost()
    prefill, breakdown = cost.prefill_time(5_000), cost.breakdown(BATCH)
    remaining = cost.remaining_prefill_time(1_000, 5_000)
    cost.time_scale = 1.08  # within 10%: prefill predictions wait
    assert (cost.prefill_time(5_000), cost.prefill_version) == (prefill, 0)
    cost.time_scale = 2.0
    assert cost.prefill_version == 1
    assert cost.prefill_time(5_000) == pytest.approx(2.0 * prefill)
    assert cost.remaining_prefill_time(1_000, 5_000) == pytest.approx(2.0 * remaining)
    assert cost.breakdown(BATCH) == breakdown
    with pytest.raises(ValueError):
        cost.time_scale = 0.0


def test_one_observation_moves_the_log_scale_by_weight_times_the_log_error() -> None:
    cost = cpu_cost()
    tracker = OnlineTimeScale(cost, weight=0.2)
    tracker.observe(0.1, 0.8)  # one 8x outlier
    assert math.log(cost.time_scale) == pytest.approx(0.2 * math.log(8.0))


def test_the_scale_is_bounded_and_meaningless_observations_are_ignored() -> None:
    cost = cpu_cost()
    tracker = OnlineTimeScale(cost, weight=1.0, bounds=(0.5, 2.0), max_step=1000.0)
    tracker.observe(0.1, 10.0)
    assert cost.time_scale == pytest.approx(2.0)
    for predicted, measured in [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, math.nan)]:
        tracker.observe(predicted, measured)
    assert cost.time_scale == pytest.approx(2.0)
    assert tracker.observations == 1
    tracker.observe(1.0, 0.01)
    assert cost.time_scale == pytest.approx(0.5)


def test_one_step_moves_the_scale_by_at_most_max_step() -> None:
    cost = cpu_cost()
    tracker = OnlineTimeScale(cost, weight=0.5, max_step=1.5)
    tracker.observe(0.01, 1.0)  # a 100x outlier, a first-call compile say
    assert cost.time_scale == pytest.approx(1.5)
    tracker.observe(1.0, 0.0001)
    assert cost.time_scale == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": 0.0},
        {"weight": 1.5},
        {"bounds": (1.5, 2.0)},
        {"max_step": 1.0},
        {"context_gain": -1.0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OnlineTimeScale(cpu_cost(), **kwargs)  # type: ignore[arg-type]


def test_the_scheduler_reprices_queued_requests_when_the_prefill_level_moves() -> None:
    cost = cpu_cost()
    scheduler = Scheduler(SchedulerConfig(policy="lars", max_batch_size=1), cost)
    scheduler.add_request("a", 3_000, 4, arrival=0.0)
    scheduler.add_request("b", 2_000, 4, arrival=0.0)
    scheduler.add_request("c", 2_000, 4, arrival=0.0, deadline=9.0)
    plan = scheduler.schedule(0.0)  # starts one; the others wait (one request at a time)
    scheduler.on_step_done(plan, plan.predicted_time)
    waiting = [r for r in scheduler.table.requests.values() if r.status is RequestStatus.WAITING]
    (queued,) = [r for r in waiting if not r.deadline_given]
    (given,) = [r for r in waiting if r.deadline_given]
    work, deadline = queued.remaining_prefill_s(cost), queued.deadline
    assert deadline == pytest.approx(max(1.5 * work, 0.5)) and deadline > 0.5
    given_base, given_work = given.key_base, given.remaining_prefill_s(cost)
    cost.time_scale = 2.0
    scheduler.schedule(plan.predicted_time)
    assert queued.remaining_prefill_s(cost) == pytest.approx(2.0 * work)
    # A default deadline is derived from the predicted work, so it follows it: the request is
    # exactly as (relatively) urgent as before. LARS: base = (arrival + d - w) / d.
    assert queued.deadline == pytest.approx(2.0 * deadline)
    assert queued.key_base == pytest.approx((2.0 * deadline - 2.0 * work) / (2.0 * deadline))
    # A caller's deadline was promised and stays; twice the work leaves it less slack.
    assert given.deadline == 9.0
    assert given.key_base == pytest.approx(given_base - given_work / 9.0)


def test_a_default_deadline_stops_following_the_level_at_the_first_token() -> None:
    cost = cpu_cost()
    scheduler = Scheduler(SchedulerConfig(policy="lars"), cost)
    scheduler.add_request("a", 2_000, 4, arrival=0.0)
    plan = scheduler.schedule(0.0)
    while not any(seq.samples for seq in plan.seqs):
        scheduler.on_step_done(plan, plan.predicted_time)
        plan = scheduler.schedule(plan.predicted_time)
    scheduler.on_step_done(plan, 1.0)
    request = scheduler.get("a")
    assert request is not None and request.first_token_time == 1.0
    deadline = request.deadline
    cost.time_scale = 3.0
    scheduler.schedule(1.0)
    assert request.deadline == deadline  # decided: the first token met it or not


# -- the context factor ---------------------------------------------------------------------------

PREFILL = [SeqShape(256, 0)]
"""Mostly linears: a short prompt's chunk."""
LATE_CHUNK = [SeqShape(32, 6_000), SeqShape(1, 400)]
"""Mostly attention: a small chunk at the end of a long prompt, plus a decode."""


def _split(cost: RooflineCostModel, seqs: list[SeqShape]) -> tuple[float, float]:
    """(rest, context) seconds of `seqs` at the calibrated level."""
    total = cost.batch_time(seqs)
    share = cost.context_share(seqs)
    return total * (1 - share), total * share


def test_the_context_factor_multiplies_only_the_context_terms() -> None:
    cost = cpu_cost()
    rest, context = _split(cost, LATE_CHUNK)
    assert 0.5 < context / (rest + context) < 1.0
    cost.context_scale = 2.0
    cost.time_scale = 1.5
    assert cost.batch_time(LATE_CHUNK) == pytest.approx(1.5 * (rest + 2.0 * context))
    pricer = cost.batch_pricer()
    for seq in LATE_CHUNK:
        pricer.add(seq)
    assert pricer.time() == pytest.approx(cost.batch_time(LATE_CHUNK))
    assert cost.context_share(LATE_CHUNK) == pytest.approx(2 * context / (rest + 2 * context))
    with pytest.raises(ValueError):
        cost.context_scale = -1.0


def test_prefill_predictions_are_rewalked_when_the_context_factor_steps() -> None:
    cost = cpu_cost()
    long_prompt, short_prompt = cost.prefill_time(6_000), cost.prefill_time(300)
    tail = cost.remaining_prefill_time(5_000, 6_000)
    cost.context_scale = 1.05  # within 10% of the walked table: nothing moves
    assert (cost.prefill_time(6_000), cost.prefill_version) == (long_prompt, 0)
    cost.context_scale = 1.5
    assert cost.prefill_version == 1
    # More of a long prompt's time is attention, and most of its tail's: they grow by more
    # than a short prompt does, and by less than 1.5x.
    short_growth = cost.prefill_time(300) / short_prompt
    long_growth = cost.prefill_time(6_000) / long_prompt
    tail_growth = cost.remaining_prefill_time(5_000, 6_000) / tail
    assert 1.0 <= short_growth < long_growth < tail_growth < 1.5


def test_the_prefill_table_extends_at_the_context_factor_it_was_walked_with() -> None:
    """The table grows on demand: a prompt longer than any asked for before extends it. That
    extension must not pick up a move of the factor below the re-walk threshold, or a
    prediction would depend on when each length was first asked for."""
    cost, fresh = cpu_cost(), cpu_cost()
    cost.prefill_time(6_000)  # walks the table to 8,192 tokens
    cost.context_scale = 1.09
    assert cost.prefill_version == 0
    assert cost.prefill_time(20_000) == fresh.prefill_time(20_000)
    cost.context_scale = 1.2
    walked_at_1_2 = cpu_cost()
    walked_at_1_2.context_scale = 1.2
    assert cost.prefill_time(20_000) == pytest.approx(walked_at_1_2.prefill_time(20_000))
    assert cost.prefill_time(20_000) > fresh.prefill_time(20_000)


def test_two_factors_learn_an_executor_whose_attention_is_off_by_a_different_factor() -> None:
    """The executor runs 1.2x slower overall and its attention 1.5x slower again than
    calibrated. One factor can only split the difference: short prefills come out too dear and
    late chunks too cheap. Two factors learn both, from alternating batches."""
    truth = {}
    for name, seqs in (("prefill", PREFILL), ("late", LATE_CHUNK)):
        rest, context = _split(cpu_cost(), seqs)
        truth[name] = (seqs, 1.2 * (rest + 1.5 * context))

    def errors(cost: RooflineCostModel) -> dict[str, float]:
        return {n: cost.batch_time(s) / t - 1 for n, (s, t) in truth.items()}

    two, one = cpu_cost(), cpu_cost()
    learn_two, learn_one = OnlineTimeScale(two), OnlineTimeScale(one)
    for _ in range(400):
        for seqs, measured in truth.values():
            learn_two.observe_batch(seqs, two.batch_time(seqs), measured)
            learn_one.observe(one.batch_time(seqs), measured)
    assert two.time_scale == pytest.approx(1.2, rel=0.02)
    assert two.context_scale == pytest.approx(1.5, rel=0.02)
    assert max(abs(e) for e in errors(two).values()) < 0.01
    assert errors(one)["prefill"] > 0.05 and errors(one)["late"] < -0.05


@pytest.mark.parametrize("shares", ["constant", "mixed"])
def test_a_uniform_drift_moves_the_level_and_not_the_context_factor(shares: str) -> None:
    """Everything 1.3x slower, the calibrated shape right: whatever mix of batches the drift
    is learned on, the context factor stays put (it learns from share deviations only)."""
    batches = [LATE_CHUNK] if shares == "constant" else [LATE_CHUNK, LATE_CHUNK, PREFILL]
    calibrated = {id(seqs): cpu_cost().batch_time(seqs) for seqs in batches}
    cost = cpu_cost()
    tracker = OnlineTimeScale(cost)
    for _ in range(150):
        for seqs in batches:
            tracker.observe_batch(seqs, cost.batch_time(seqs), 1.3 * calibrated[id(seqs)])
    assert cost.time_scale == pytest.approx(1.3, rel=0.01)
    assert cost.context_scale == pytest.approx(1.0, abs=0.02)
    # Prefill predictions followed the level alone: no re-walk at another context factor.
    assert cost.prefill_time(6_000) == pytest.approx(
        cost.prefill_scale * cpu_cost().prefill_time(6_000), rel=1e-12
    )


def test_the_context_factor_learns_from_share_deviations_only() -> None:
    cost = cpu_cost()
    tracker = OnlineTimeScale(cost)
    tracker.observe(0.1, 0.2)  # no share: the level alone
    assert cost.context_scale == 1.0 and cost.time_scale > 1.0 and tracker.mean_share is None
    tracker.observe(0.1, 0.2, context_share=0.5)  # the first share is the mean: no deviation
    assert cost.context_scale == 1.0 and tracker.mean_share == 0.5
    tracker.observe(0.1, 0.2, context_share=0.9)
    assert cost.context_scale == pytest.approx(math.exp(3 * 0.1 * math.log(2.0) * (0.9 - 0.5)))
    assert tracker.mean_share == pytest.approx(0.54)
    with pytest.raises(ValueError, match="context_share"):
        tracker.observe(0.1, 0.2, context_share=1.5)
