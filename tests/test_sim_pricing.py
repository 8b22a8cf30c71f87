"""Incremental batch pricing (medha.scheduler.pricing, medha.perf.batch_sums), which makes the
scheduler and the simulator fast: it must agree exactly with pricing the whole list, and the
scheduler must make the same decisions with or without it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.perf import A100_80GB, H100_80GB, LLAMA_3_8B, LLAMA_3_70B, ReplicaSpec, RooflineCostModel
from medha.scheduler import Scheduler, SchedulerConfig, SeqShape
from medha.scheduler.cost import head_only
from medha.scheduler.kvp import shard_sizes
from medha.scheduler.pricing import ListPricer, new_pricer
from medha.sim import SimRequest, Simulator, plan_times
from tests.scheduler_support import ToyCost

MODELS = {
    "8b-tp1": RooflineCostModel(LLAMA_3_8B, H100_80GB),
    "8b-tp8-pp2": RooflineCostModel(LLAMA_3_8B, A100_80GB, ReplicaSpec(tp=8, pp=2)),
    "70b-tp8-pp3-kvp4": RooflineCostModel(
        LLAMA_3_70B, H100_80GB, ReplicaSpec(tp=8, pp=3, kvp=4, kvp_max_tokens_per_group=100_000)
    ),
}


def shapes(max_groups: int) -> st.SearchStrategy[list[SeqShape]]:
    seq = st.builds(
        SeqShape,
        st.one_of(st.just(1), st.integers(1, 9000)),
        st.integers(0, 2_000_000),
        st.integers(1, max_groups),
        # The LM head on one row, on every row of a scored chunk, or on another group (0).
        st.one_of(st.just(1), st.integers(0, 9000)),
    )
    # The head rows of a sequence another group ran, on the sampling group.
    reported = st.builds(head_only, st.one_of(st.just(1), st.integers(1, 9000)))
    return st.lists(st.one_of(seq, reported), min_size=1, max_size=40)


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fast_batch_and_stage_times_equal_the_sum_of_their_terms(
    name: str, data: st.DataObject
) -> None:
    model = MODELS[name]
    batch = data.draw(shapes(model.replica.kvp))
    efficiency = model.profile.efficiency
    assert model.batch_time(batch) == pytest.approx(
        model.batch_terms(batch).seconds(efficiency), rel=1e-12
    )
    assert model.stage_time(batch) == pytest.approx(
        model.stage_terms(batch).seconds(efficiency), rel=1e-12
    )


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_pricer_prices_a_growing_batch_exactly_like_the_whole_list(
    name: str, data: st.DataObject
) -> None:
    model = MODELS[name]
    batch = data.draw(shapes(model.replica.kvp))
    extra = data.draw(shapes(model.replica.kvp))[0]
    pricer = new_pricer(model)
    assert not isinstance(pricer, ListPricer)
    assert pricer.time() == 0.0
    for index, seq in enumerate(batch):
        pricer.add(seq)
        assert pricer.time() == model.batch_time(batch[: index + 1])
    assert pricer.time_with(extra) == model.batch_time([*batch, extra])
    assert pricer.stage_time() == model.stage_time(batch)
    assert pricer.time() == model.batch_time(batch)  # asking about `extra` changed nothing


def test_cost_models_without_a_pricer_get_a_list_pricer() -> None:
    toy = ToyCost(pp_stages=2)
    pricer = new_pricer(toy)
    assert isinstance(pricer, ListPricer)
    batch = [SeqShape(1, 500), SeqShape(300, 0)]
    for seq in batch:
        pricer.add(seq)
    assert pricer.time() == toy.batch_time(batch)
    assert pricer.stage_time() == toy.stage_time(batch)
    assert pricer.time_with(SeqShape(64, 10)) == toy.batch_time([*batch, SeqShape(64, 10)])


class WithoutPricer:
    """The same cost model, hiding its pricer: the scheduler falls back to whole-list pricing."""

    def __init__(self, model: RooflineCostModel) -> None:
        self.model = model

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.model.batch_time(seqs)

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.model.stage_time(seqs)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.model.prefill_time(prompt_tokens)

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        return self.model.remaining_prefill_time(processed_tokens, prompt_tokens)


@pytest.mark.parametrize("policy", ["lars", "fcfs-chunked"])
def test_the_scheduler_decides_the_same_with_or_without_incremental_pricing(policy: str) -> None:
    model = RooflineCostModel(
        LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8, pp=2, kvp=2, kvp_max_tokens_per_group=65_536)
    )
    config = SchedulerConfig(
        policy=policy,  # type: ignore[arg-type]
        pp_stages=2,
        kvp_groups=2,
        max_tokens_per_kvp_group=65_536,
        num_blocks=20_000,
        long_prefill_threshold=32_768,
    )
    requests = [SimRequest("long", 0.0, 120_000, 8)]
    requests += [SimRequest(f"s{i}", 0.05 * i, 200 + 97 * i, 12) for i in range(40)]
    fast = Simulator(config, model, trace_chunks_from=1).run(requests)
    slow = Simulator(config, WithoutPricer(model), trace_chunks_from=1).run(requests)
    assert fast.chunks == slow.chunks
    assert fast.records == slow.records


def test_every_plan_is_priced_as_its_groups_run_it_shard_by_shard() -> None:
    # The scheduler prices a plan while building it, group by group, each sequence at the
    # shard that group holds; re-pricing the finished plan from its shards gives the same
    # times, across group boundaries (an appending group holding 0 tokens included) and for
    # decodes spread over groups.
    limit = 65_536
    model = RooflineCostModel(
        LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8, pp=2, kvp=4, kvp_max_tokens_per_group=limit)
    )
    config = SchedulerConfig(
        pp_stages=2, kvp_groups=4, max_tokens_per_kvp_group=limit, num_blocks=20_000
    )
    scheduler = Scheduler(config, model)
    for index, (prompt, output) in enumerate([(150_000, 40), (2 * limit, 30), (2000, 50)]):
        scheduler.add_request(f"r{index}", prompt, output, arrival=0.0)
    now, plans, spread = 0.0, 0, 0
    while scheduler.has_work:
        plan = scheduler.schedule(now)
        assert not plan.is_empty
        stage, batch = plan_times(plan, model)
        assert batch == pytest.approx(plan.predicted_time, rel=1e-9)
        assert stage == pytest.approx(plan.predicted_stage_time, rel=1e-9)
        plans += 1
        spread += any(len(seq.shards) > 1 for seq in plan.seqs)
        scheduler.on_stage0_done(plan)
        now += batch
        scheduler.on_step_done(plan, now)
    assert plans > 80 and spread > 50


def test_a_requests_kv_shards_are_full_groups_then_the_rest() -> None:
    assert shard_sizes(700, 1, None) == (700,)
    assert shard_sizes(300, 2, 256) == (256, 44)
    assert shard_sizes(512, 3, 256) == (256, 256, 0)
    with pytest.raises(ValueError, match="do not reach"):
        shard_sizes(200, 2, 256)
    with pytest.raises(ValueError, match="limit"):
        shard_sizes(300, 2, None)


def test_right_after_onboarding_a_group_the_full_group_before_it_sets_the_pace() -> None:
    # The request's first group still attends to all its M tokens: a chunk costs at least what
    # it costs one replica over M tokens of context, not what half the KV would.
    limit = 65_536
    kvp = RooflineCostModel(
        LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8, kvp=2, kvp_max_tokens_per_group=limit)
    )
    alone = RooflineCostModel(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8))
    config = SchedulerConfig(kvp_groups=2, max_tokens_per_kvp_group=limit, num_blocks=20_000)
    scheduler = Scheduler(config, kvp)
    scheduler.add_request("long", 100_000, 1, arrival=0.0)
    now = 0.0
    while True:
        plan = scheduler.schedule(now)
        (seq,) = plan.seqs
        if seq.start >= limit:
            break
        scheduler.on_stage0_done(plan)
        now += plan.predicted_time
        scheduler.on_step_done(plan, now)
    assert seq.start == limit and len(seq.shards) == 2
    one_replica = alone.batch_time([SeqShape(seq.q_tokens, limit)])
    assert plan.predicted_time >= one_replica
    assert plan.predicted_time > 1.3 * alone.batch_time([SeqShape(seq.q_tokens, limit // 2)])
