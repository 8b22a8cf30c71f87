"""The engine's prefill table is re-walked a slice per poll when context_scale moves, and
installed once walked out to the longest prompt: no single call walks it all."""

from __future__ import annotations

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


def count_chunk_pricings(cost: RooflineCostModel) -> list[int]:
    """A one-item list counting every chunk priced for a prefill table from now on."""
    count = [0]
    price = cost._raw_chunk_times

    def counting(chunk: SeqShape, context_scale: float) -> tuple[float, float]:
        count[0] += 1
        return price(chunk, context_scale)

    cost._raw_chunk_times = counting  # type: ignore[method-assign]
    return count


def poll_until_installed(refresher: PrefillTableRefresher) -> int:
    """Polls until the due table is installed; how many it took."""
    installed, polls = refresher.installed, 0
    while refresher.installed == installed:
        refresher.poll()
        polls += 1
        assert polls < 100_000
    return polls


def test_a_context_scale_step_is_walked_a_slice_per_poll_and_then_installed() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO, slice_seconds=0.0)
    before, version = cost.prefill_time(6000), cost.prefill_version
    priced = count_chunk_pricings(cost)

    cost.context_scale = 1.5
    assert cost.prefill_table_due == 1.5
    # Until the new table is installed, the old one answers, and nothing was walked yet.
    assert (cost.prefill_time(6000), cost.prefill_version, priced[0]) == (before, version, 0)
    refresher.poll()
    assert priced[0] > 0 and refresher.walking and cost.prefill_version == version
    polls = poll_until_installed(refresher)
    assert polls > 20  # a zero-second slice walks one grid point per poll
    assert (cost.prefill_version, refresher.installed) == (version + 1, 1)
    assert cost.prefill_table_due is None and not refresher.walking

    at_once = cpu_cost()  # no refresher: the setter walks the new table itself
    at_once.context_scale = 1.5
    assert cost.prefill_time(6000) == at_once.prefill_time(6000) > before
    walked = priced[0]
    assert cost.prefill_time(WALK_TO) > 0
    assert priced[0] == walked  # walked out to WALK_TO before it was installed


def test_a_generous_slice_walks_the_whole_table_in_one_poll() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO, slice_seconds=60.0)
    cost.context_scale = 1.5
    refresher.poll()
    assert refresher.installed == 1 and cost.prefill_table_due is None


def test_a_walk_no_longer_due_is_dropped() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO, slice_seconds=0.0)
    before, version = cost.prefill_time(6000), cost.prefill_version
    cost.context_scale = 1.5
    refresher.poll()
    cost.context_scale = 1.05  # back within 10% of the table in use
    refresher.poll()
    assert not refresher.walking
    assert (cost.prefill_version, refresher.installed) == (version, 0)
    assert cost.prefill_time(6000) == before


def test_a_scale_that_moved_on_during_the_walk_gets_another_table() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO, slice_seconds=0.0)
    cost.context_scale = 1.5
    refresher.poll()
    cost.context_scale = 2.5
    poll_until_installed(refresher)  # the 1.5 table, and 2.5 is due next
    assert cost.prefill_table_due == 2.5
    poll_until_installed(refresher)
    assert refresher.installed == 2 and cost.prefill_table_due is None
    at_once = cpu_cost()
    at_once.context_scale = 2.5
    assert cost.prefill_time(6000) == at_once.prefill_time(6000)


def test_the_slice_is_checked() -> None:
    with pytest.raises(ValueError, match="slice_seconds"):
        PrefillTableRefresher(cpu_cost(), WALK_TO, slice_seconds=-1.0)
    with pytest.raises(ValueError, match="walk_to"):
        PrefillTableRefresher(cpu_cost(), 0, slice_seconds=0.0)


def test_the_online_learner_polls_after_each_observation() -> None:
    cost = cpu_cost()
    refresher = PrefillTableRefresher(cost, WALK_TO, slice_seconds=0.0)
    learner = OnlineTimeScale(cost, tables=refresher)
    long_context = [SeqShape(32, 6000), SeqShape(1, 100)]
    short_context = [SeqShape(256, 0)]
    # Attention-heavy iterations twice as slow as predicted, the others on time: context_scale
    # climbs past the 10% step, and the observations walk and install its table.
    for _ in range(300):
        slow = cost.batch_time(long_context)
        learner.observe_batch(long_context, slow, 2 * slow)
        fast = cost.batch_time(short_context)
        learner.observe_batch(short_context, fast, fast)
    assert cost.context_scale > 1.1
    assert refresher.installed >= 1
