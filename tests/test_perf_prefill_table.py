"""Prefill-time predictions for LARS: consistent, monotone, accurate, and cheap to query."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.perf import (
    CPU,
    H100_80GB,
    LLAMA_3_8B,
    LLAMA_3_70B,
    SMOLLM2_135M,
    ChunkBudget,
    ReplicaSpec,
    RooflineCostModel,
)
from medha.perf.prefill_table import PrefillTable
from medha.scheduler.cost import SeqShape
from medha.sim import Deployment, SimRequest, Simulator

MILLION = 1_000_000

COST_8B = RooflineCostModel(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8, pp=2))


def exact_prefill_time(cost: RooflineCostModel, prompt: int, chunk: int = 2048) -> float:
    """The table's definition, walked chunk by chunk without interpolation (kvp = 1)."""
    stage_sum, drain = 0.0, 0.0
    for start in range(0, prompt, chunk):
        batch, stage = cost.chunk_times(SeqShape(min(chunk, prompt - start), start))
        stage_sum += stage
        drain = max(drain, batch - stage)
    return stage_sum + drain


@pytest.mark.parametrize("prompt", [1, 7, 100, 2048, 2049, 30_000, 123_457, 400_000])
def test_table_matches_the_chunk_by_chunk_sum(prompt: int) -> None:
    assert COST_8B.prefill_time(prompt) == pytest.approx(
        exact_prefill_time(COST_8B, prompt), rel=0.01
    )


def test_without_pipelining_prefill_time_is_the_sum_of_chunk_batch_times() -> None:
    cost = RooflineCostModel(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8))
    chunks = [SeqShape(2048, start) for start in range(0, 20_480, 2048)]
    assert cost.prefill_time(20_480) == pytest.approx(sum(cost.batch_time([c]) for c in chunks))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3 * MILLION))
def test_remaining_from_zero_is_the_whole_prefill_and_nothing_remains_at_the_end(n: int) -> None:
    assert COST_8B.remaining_prefill_time(0, n) == COST_8B.prefill_time(n)
    assert COST_8B.remaining_prefill_time(n, n) == 0.0
    assert COST_8B.remaining_prefill_time(n + 5, n) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2 * MILLION), st.integers(0, 2 * MILLION), st.integers(0, 2 * MILLION))
def test_prefill_time_grows_with_the_prompt_and_remaining_work_shrinks_with_progress(
    a: int, b: int, total: int
) -> None:
    small, large = sorted((a, b))
    assert COST_8B.prefill_time(small) <= COST_8B.prefill_time(large)
    assert COST_8B.remaining_prefill_time(small, total) >= COST_8B.remaining_prefill_time(
        large, total
    )


def test_long_prompts_cost_quadratically() -> None:
    ratio = COST_8B.prefill_time(MILLION) / COST_8B.prefill_time(MILLION // 2)
    assert 3.0 < ratio < 4.0


def test_stream_pipelining_divides_long_prefill_time_nearly_by_the_stage_count() -> None:
    flat = RooflineCostModel(LLAMA_3_70B, H100_80GB, ReplicaSpec(tp=8, pp=1))
    piped = RooflineCostModel(LLAMA_3_70B, H100_80GB, ReplicaSpec(tp=8, pp=4))
    speedup = flat.prefill_time(MILLION) / piped.prefill_time(MILLION)
    assert 3.5 < speedup <= 4.0


def test_kvp_spreads_a_long_prompt_and_never_lets_a_chunk_straddle_a_shard() -> None:
    shard = 100_000
    replica = ReplicaSpec(tp=8, kvp=4, kvp_max_tokens_per_group=shard)
    seen: list[SeqShape] = []

    def chunk_times(chunk: SeqShape) -> tuple[float, float]:
        seen.append(chunk)
        return 1.0, 1.0

    PrefillTable(chunk_times, replica, chunk_tokens=3000).prefill_time(500_000)
    # Each chunk is priced on its groups' shards: full ones (M tokens) and the appending one,
    # which the chunk never takes past M while a group is left to onboard.
    assert {chunk.kvp_groups for chunk in seen} == {1, 2, 3, 4}
    for chunk in seen:
        full = chunk.kv_tokens == shard and chunk.kvp_groups > 1
        if chunk.kvp_groups < 4 and not full:
            assert chunk.kv_tokens + chunk.q_tokens <= shard
    multi = [chunk for chunk in seen if chunk.kvp_groups > 1]
    assert {chunk.kvp_groups for chunk in multi if chunk.kv_tokens == shard} == {2, 3, 4}
    one = RooflineCostModel(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8))
    spread = RooflineCostModel(LLAMA_3_8B, H100_80GB, replica)
    assert spread.prefill_time(MILLION) < 0.75 * one.prefill_time(MILLION)


def test_lookups_within_the_table_do_not_recompute_chunks() -> None:
    calls = 0

    def chunk_times(chunk: SeqShape) -> tuple[float, float]:
        nonlocal calls
        calls += 1
        return 1e-3 * chunk.q_tokens, 1e-3 * chunk.q_tokens

    table = PrefillTable(chunk_times, ReplicaSpec(), chunk_tokens=512)
    table.prefill_time(100_000)
    built = calls
    for n in range(0, 100_000, 997):
        table.remaining_prefill_time(n // 3, n)
    assert calls == built
    assert table.prefill_time(100_000) == pytest.approx(100.0)


def test_negative_token_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        COST_8B.prefill_time(-1)
    with pytest.raises(ValueError):
        COST_8B.remaining_prefill_time(-1, 10)


CPU_SMOLLM2 = Deployment(
    SMOLLM2_135M,
    # The coefficients the engine's start-up calibration fitted on the 2-core CPU (2026-11-29):
    # 7 ms per iteration and 0.2 ms per sequence on top of the matmuls and attention.
    CPU.with_efficiency(
        dataclasses.replace(
            CPU.efficiency,
            matmul=1.21,
            attention=0.87,
            iteration_overhead_s=0.0074,
            sequence_overhead_s=0.0002,
            kv_gather_s=6.3e-8,
        )
    ),
    ReplicaSpec(),
    dtype_bytes=4,
)


def lone_prefill_seconds(deployment: Deployment, prompt: int, budget: ChunkBudget | None) -> float:
    """Simulated TTFT of one prompt on an idle replica under LARS with a `budget`-second
    iteration target, the executor being the same cost model (so every step is exact)."""
    config = deployment.scheduler_config(policy="lars", target_batch_time=0.25)
    cost = deployment.cost_model(budget)
    result = Simulator(config, cost).run([SimRequest("alone", 0.0, prompt, 1)])
    (record,) = result.records
    return record.first_token_time


@pytest.mark.parametrize(
    ("deployment", "prompt"),
    [
        # A CPU: every iteration re-reads the weights, so small chunks cost more per token.
        (CPU_SMOLLM2, 6_000),
        # A GPU node at the end of a long prompt, where the budget shrinks chunks below 2048.
        (Deployment(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8)), 2_000_000 // 8),
    ],
)
def test_with_the_schedulers_budget_a_lone_prompt_takes_exactly_its_predicted_time(
    deployment: Deployment, prompt: int
) -> None:
    # LARS's invariant: a request running alone keeps its slack, so its remaining work must
    # fall exactly as fast as it runs. That holds when the table cuts chunks as the scheduler.
    budget = ChunkBudget(0.25)
    predicted = deployment.cost_model(budget).prefill_time(prompt)
    assert lone_prefill_seconds(deployment, prompt, budget) == pytest.approx(predicted, rel=0.01)


def test_a_fixed_reference_chunk_underestimates_a_cpus_lone_prefill() -> None:
    # Why the budget is passed: 2048-token reference chunks hide the per-iteration cost that
    # the 0.25 s budget's ~100-token chunks pay.
    reference = CPU_SMOLLM2.cost_model().prefill_time(6_000)
    assert lone_prefill_seconds(CPU_SMOLLM2, 6_000, None) > 1.1 * reference


def test_a_chunk_budget_is_checked_when_made() -> None:
    with pytest.raises(ValueError):
        ChunkBudget(0.0)
    with pytest.raises(ValueError):
        ChunkBudget(0.05, min_chunk=48, multiple=32)


@pytest.mark.parametrize("spp", [True, False])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_a_lone_prompt_through_a_pipeline_takes_its_predicted_time(pp: int, spp: bool) -> None:
    # LARS's invariant through pipeline stages too (uneven ones at pp = 3). Without SPP a chunk
    # waits for the one before it to leave the last stage: the prompt takes the sum of its
    # chunks' batch times, not the stage times plus one drain that SPP takes.
    deployment = Deployment(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8, pp=pp))
    config = deployment.scheduler_config(policy="lars", target_batch_time=0.05, spp=spp)
    cost = deployment.cost_model(ChunkBudget.of(config))
    prompt = 100_000
    (record,) = Simulator(config, cost).run([SimRequest("alone", 0, prompt, 1)]).records
    assert record.first_token_time == pytest.approx(cost.prefill_time(prompt), rel=0.01)
    assert record.met_deadline
    if not spp:
        streamed = deployment.cost_model(ChunkBudget.of(config.model_copy(update={"spp": True})))
        assert cost.prefill_time(prompt) > 1.5 * streamed.prefill_time(prompt)


@pytest.mark.parametrize(("kvp", "shard", "prompt"), [(2, 100_000, 180_000), (4, 65_536, 250_000)])
def test_a_lone_prompt_over_kvp_groups_takes_its_predicted_time(
    kvp: int, shard: int, prompt: int
) -> None:
    # Each chunk costs what its slowest group runs (a full shard once a group is onboarded),
    # and is cut as the scheduler cuts it, up to the next shard boundary. (Past
    # long_prefill_threshold, 256K tokens, LARS's space sharing is not modelled.)
    replica = ReplicaSpec(tp=8, kvp=kvp, kvp_max_tokens_per_group=shard)
    deployment = Deployment(LLAMA_3_8B, H100_80GB, replica)
    config = deployment.scheduler_config(policy="lars", target_batch_time=0.05)
    cost = deployment.cost_model(ChunkBudget.of(config))
    (record,) = Simulator(config, cost).run([SimRequest("alone", 0, prompt, 1)]).records
    assert record.first_token_time == pytest.approx(cost.prefill_time(prompt), rel=0.002)
