"""The engine keeps its cost model level with the executor: every iteration it runs is an
observation, and the learned factor is in `stats()`."""

from __future__ import annotations

import pytest

import medha
from medha import SamplingParams
from tests.engine_support import engine_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _generate_some(engine: medha.Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for prompt in ([1, 2, 3] * 40, [7, 8] * 10):
        await engine.generate(prompt, params)


async def test_each_iteration_rescales_the_cost_model() -> None:
    async with medha.Engine(engine_config(policy="lars")) as engine:
        await _generate_some(engine)
        stats = engine.stats()
        tracker = engine._actor().time_scale
        assert tracker is not None
        assert tracker.observations == stats.iterations > 0
        # Calibration never predicts a live iteration exactly, so the factor moved; the
        # scheduler prices batches with the very model it rescales.
        assert stats.time_scale != 1.0
        # Prefill and decode iterations have different context shares: the context factor
        # learned from them too.
        assert stats.context_scale != 1.0
        assert tracker.mean_share is not None
        assert tracker.cost is engine._actor().scheduler.cost
        # Its prefill tables are walked a slice per iteration, out to the longest prompt.
        assert tracker.tables is not None and tracker.tables.cost is tracker.cost
        assert tracker.tables.walk_to == engine.max_model_len
        assert tracker.tables.slice_seconds == 0.02 * engine.config.target_batch_time
        assert tracker.cost.defer_prefill_tables  # type: ignore[attr-defined]


async def test_with_the_switch_off_predictions_stay_as_calibrated() -> None:
    config = engine_config(policy="lars", online_time_scale=False)
    async with medha.Engine(config) as engine:
        await _generate_some(engine)
        assert engine._actor().time_scale is None
        assert engine.stats().time_scale == engine.stats().context_scale == 1.0
        assert engine._actor().scheduler.cost.time_scale == 1.0  # type: ignore[attr-defined]


async def test_a_default_deadline_reported_is_the_one_in_force_at_the_first_token() -> None:
    """When the prefill level moves after a request was queued, its default deadline follows
    the re-predicted work (the caller's does not), and its metrics report that deadline."""
    config = engine_config(policy="lars", online_time_scale=False)
    async with medha.Engine(config) as engine:
        scheduler = engine._actor().scheduler
        cost = scheduler.cost
        schedule = scheduler.schedule
        # Levels far above 1: the predictions stay well over the default deadline's floor
        # (0.5 s) however fast this machine's calibration finds a 120-token prefill.
        level = {"next": 10_000.0, "moves": 0}
        given_deadlines: set[float] = set()

        def slower_then_schedule(now: float):  # type: ignore[no-untyped-def]
            # The engine schedules only while it has work: the level moves after admission.
            if cost.time_scale != level["next"]:  # type: ignore[attr-defined]
                cost.time_scale = level["next"]  # type: ignore[attr-defined]
                level["moves"] += 1
            plan = schedule(now)
            given_deadlines.update(
                r.deadline for r in scheduler.table.requests.values() if r.deadline_given
            )
            return plan

        scheduler.schedule = slower_then_schedule  # type: ignore[method-assign]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        default = await engine.generate([1, 2, 3] * 40, params)
        predicted = cost.prefill_time(120)
        level["next"] = 20_000.0
        given = await engine.generate([1, 2, 3] * 40, params, deadline=0.7)
    assert level["moves"] == 2  # once with each request pending
    assert predicted > 1.0  # the level moved a lot: the default is 1.5x the new prediction
    assert default.metrics.deadline == pytest.approx(1.5 * predicted)
    assert default.metrics.deadline_met is True
    assert given.metrics.deadline == 0.7
    assert given_deadlines == {0.7}  # re-priced while pending, the scheduler kept it too
    # The engine's metrics judge each first token by the same deadline.
    ratios = engine.metrics.registry.get_sample_value(
        "medha:first_token_deadline_ratio_sum", {"model_name": engine.metrics.model_name}
    )
    runs = [default.metrics, given.metrics]
    assert ratios == pytest.approx(sum((m.ttft or 0) / m.deadline for m in runs))


async def test_a_lone_prefills_long_iterations_do_not_teach_the_time_scale() -> None:
    # They run chunks far larger than any ordinary batch's, whose error is not the level the
    # ordinary batches run at: learning from them raised every chat's predicted time.
    config = engine_config(target_batch_time=0.002, lone_batch_time=0.05, online_time_scale=True)
    async with medha.Engine(config, record_iterations=True) as engine:
        start = engine.stats().time_scale
        await engine.generate([1 + i % 500 for i in range(1500)], SamplingParams.greedy(1))
        after_lone = engine.stats().time_scale
        history = engine.iteration_history
    assert max(record.predicted_seconds for record in history) > 0.002 * 1.25
    assert after_lone == start
