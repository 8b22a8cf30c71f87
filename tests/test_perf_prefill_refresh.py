"""The engine's prefill table is re-walked on a thread of its own when context_scale moves, and
installed between iterations: the scheduling thread never walks it."""

from __future__ import annotations

import threading

import pytest

from medha.perf import CPU, SMOLLM2_135M, ChunkBudget, ReplicaSpec, RooflineCostModel
from medha.perf.prefill_refresh import PrefillTableRefresher
from medha.perf.time_scale import OnlineTimeScale
from medha.scheduler.cost import SeqShape

WALK_TO = 8192


def cpu_cost() -> RooflineCostModel:
    return RooflineCostModel(
        SMOLLM2_135M, CPU, ReplicaSpec(), dtype_bytes=4, prefill_chunking=ChunkBudget(0.25)
    )


def walking_threads(cost: RooflineCostModel) -> set[str]:
    """Records the name of every thread that prices a chunk for a prefill table from now on."""
    names: set[str] = set()
    price = cost._raw_chunk_times

    def recording(chunk: SeqShape, context_scale: float) -> tuple[float, float]:
        names.add(threading.current_thread().name)
        return price(chunk, context_scale)

    cost._raw_chunk_times = recording  # type: ignore[method-assign]
    return names


def test_a_context_scale_step_is_walked_on_another_thread_and_installed_by_poll() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO)
    before, version = cost.prefill_time(6000), cost.prefill_version
    names = walking_threads(cost)

    cost.context_scale = 1.5
    assert cost.prefill_table_due == 1.5
    # Until the new table is installed, the old one answers, and nothing was walked here.
    assert (cost.prefill_time(6000), cost.prefill_version) == (before, version)
    refresher.poll()
    refresher.wait()
    assert cost.prefill_version == version
    refresher.poll()
    assert (cost.prefill_version, refresher.installed) == (version + 1, 1)
    assert cost.prefill_table_due is None
    assert names == {"medha-prefill-table"}

    at_once = cpu_cost()  # no refresher: the setter walks the new table itself
    at_once.context_scale = 1.5
    assert cost.prefill_time(6000) == at_once.prefill_time(6000) > before
    names.clear()
    assert cost.prefill_time(WALK_TO) > 0
    assert not names  # walked out to WALK_TO before it was installed


def test_a_table_no_longer_due_when_its_walk_ends_is_dropped() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO)
    before, version = cost.prefill_time(6000), cost.prefill_version
    cost.context_scale = 1.5
    refresher.poll()
    cost.context_scale = 1.05  # back within 10% of the table in use
    refresher.wait()
    refresher.poll()
    assert (cost.prefill_version, refresher.installed) == (version, 0)
    assert cost.prefill_time(6000) == before


def test_a_scale_that_moved_on_during_the_walk_gets_another_walk() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO)
    cost.context_scale = 1.5
    refresher.poll()
    cost.context_scale = 2.5
    refresher.wait()
    refresher.poll()  # installs the 1.5 table (closer than 1.0) and starts walking at 2.5
    assert cost.prefill_table_due == 2.5
    refresher.wait()
    refresher.poll()
    assert refresher.installed == 2
    assert cost.prefill_table_due is None
    at_once = cpu_cost()
    at_once.context_scale = 2.5
    assert cost.prefill_time(6000) == at_once.prefill_time(6000)


def test_an_error_in_the_walk_is_raised_by_poll() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO)

    def broken(chunk: SeqShape, context_scale: float) -> tuple[float, float]:
        raise ArithmeticError("broken profile")

    cost._raw_chunk_times = broken  # type: ignore[method-assign]
    cost.context_scale = 1.5
    refresher.poll()
    refresher.wait()
    with pytest.raises(ArithmeticError, match="broken profile"):
        refresher.poll()


def test_the_online_learner_polls_after_each_observation() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO)
    learner = OnlineTimeScale(cost, tables=refresher)
    long_context = [SeqShape(32, 6000), SeqShape(1, 100)]
    short_context = [SeqShape(256, 0)]
    # Attention-heavy iterations twice as slow as predicted, the others on time: context_scale
    # climbs past the 10% step.
    for _ in range(30):
        learner.observe_batch(
            long_context, cost.batch_time(long_context), 2 * cost.batch_time(long_context)
        )
        learner.observe_batch(
            short_context, cost.batch_time(short_context), cost.batch_time(short_context)
        )
        refresher.wait()
    assert cost.context_scale > 1.1
    assert refresher.installed >= 1
