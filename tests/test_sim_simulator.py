"""The simulator end to end: deterministic, conserves requests and KV blocks, and shows what
the paper shows (FCFS convoys, LARS does not; SPP and KVP speed up long requests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medha.perf import A100_80GB, H100_80GB, LLAMA_3_8B, LLAMA_3_70B, ChunkBudget, ReplicaSpec
from medha.scheduler import POLICY_NAMES, SchedulerConfig, SeqShape
from medha.sim import (
    Deployment,
    PipelineExecutor,
    SimRequest,
    SimResult,
    Simulator,
    load_trace,
    synthetic_workload,
)
from medha.sim.report import results_json, results_table
from medha.sim.runs import PolicyRun
from medha.sim.traces import BUNDLED_DIR, TRACES_ENV
from tests.scheduler_support import ToyCost

NODE_8B = Deployment(LLAMA_3_8B, H100_80GB, ReplicaSpec(tp=8))
"""Llama-3-8B on one 8 x H100 node: a 200K-token prompt takes ~5 s alone."""


def simulate(
    deployment: Deployment, requests: Sequence[SimRequest], **settings: object
) -> SimResult:
    config = deployment.scheduler_config(**settings)
    return Simulator(config, deployment.cost_model(ChunkBudget.of(config))).run(requests)


def convoy_workload() -> list[SimRequest]:
    """A 200K-token prompt at t=0.5 s among 60 short prompts arriving every 0.25 s."""
    requests = [SimRequest("long", 0.5, 200_000, 8, label="long")]
    requests += [SimRequest(f"s{i}", 0.25 * i, 1000 + 37 * (i % 20), 16) for i in range(60)]
    return requests


def assert_conserved(result: SimResult, requests: Sequence[SimRequest]) -> None:
    """Every request finished with exactly its output tokens; every KV block is free again."""
    assert not result.rejected
    by_id = {r.request_id: r for r in requests}
    assert sorted(r.request_id for r in result.records) == sorted(by_id)
    for record in result.records:
        request = by_id[record.request_id]
        assert record.output_tokens == request.output_tokens
        assert record.prompt_tokens == request.prompt_tokens
        assert request.arrival < record.first_token_time <= record.finish_time
    for stats in result.final_stats:
        assert stats.free_blocks == stats.total_blocks
        assert stats.queued == stats.running == stats.plans_in_flight == 0


# -- the paper's effects ----------------------------------------------------------------------


def test_fcfs_makes_short_requests_wait_for_a_long_prefill_and_lars_does_not() -> None:
    requests = convoy_workload()
    long_alone = NODE_8B.cost_model(ChunkBudget.of(SchedulerConfig())).prefill_time(200_000)
    fcfs, lars = (simulate(NODE_8B, requests, policy=p) for p in ("fcfs", "lars"))
    # FCFS: the shorts that arrive during the long prefill wait for all of it (the convoy).
    assert fcfs.summary("short").ttft_p90 > 0.6 * long_alone
    assert fcfs.summary("short").ttft_p99 > 0.8 * long_alone
    # LARS: every short meets its 0.5 s default deadline; the long one still meets its own.
    assert lars.summary("short").ttft_p99 < 0.5
    assert lars.summary("short").deadline_attainment == 1.0
    assert lars.summary("long").ttft_p50 < 1.5 * long_alone
    for result in (fcfs, lars):
        assert_conserved(result, requests)


def test_stream_pipelining_divides_a_long_prefills_ttft_by_nearly_the_stage_count() -> None:
    request = [SimRequest("long", 0.0, 100_000, 4)]
    ttft = {}
    for pp, spp in [(1, True), (4, False), (4, True)]:
        deployment = Deployment(LLAMA_3_70B, H100_80GB, ReplicaSpec(tp=8, pp=pp))
        ttft[pp, spp] = simulate(deployment, request, spp=spp).records[0].ttft
    assert ttft[4, False] > 0.95 * ttft[1, True]  # without SPP chunks go one at a time
    assert ttft[4, True] < ttft[1, True] / 3.0  # with SPP they stream through 4 stages


def test_kv_parallelism_lowers_ttft_and_tpot_of_a_million_token_request() -> None:
    request = [SimRequest("long", 0.0, 1_000_000, 16)]
    records = {}
    for kvp, group_tokens in [(1, None), (4, 250_016)]:
        replica = ReplicaSpec(tp=8, kvp=kvp, kvp_max_tokens_per_group=group_tokens)
        deployment = Deployment(LLAMA_3_8B, H100_80GB, replica)
        records[kvp] = simulate(deployment, request).records[0]
    assert records[4].ttft < 0.6 * records[1].ttft
    tpot_1, tpot_4 = records[1].tpot, records[4].tpot
    assert tpot_1 is not None and tpot_4 is not None and tpot_4 < 0.7 * tpot_1


# -- determinism and conservation -----------------------------------------------------------


def test_the_same_seed_gives_identical_metrics_and_another_seed_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TRACES_ENV, str(BUNDLED_DIR))
    trace = load_trace("sharegpt")
    deployment = Deployment(LLAMA_3_8B, A100_80GB, ReplicaSpec(tp=8, pp=2))

    def run(seed: int) -> SimResult:
        requests = synthetic_workload(trace, 60, 2.0, seed, long_fraction=0.05)
        return simulate(deployment, requests, policy="lars")

    first, again, other = run(5), run(5), run(6)
    assert first.records == again.records
    assert first.summary() == again.summary()
    assert first.chunks == again.chunks and first.plans == again.plans
    assert other.summary() != first.summary()


@dataclass(frozen=True)
class Setup:
    config: SchedulerConfig
    replicas: int
    routing: str


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    kvp = draw(st.sampled_from([1, 2]))
    config = SchedulerConfig(
        policy=draw(st.sampled_from(POLICY_NAMES)),
        kvp_groups=kvp,
        max_tokens_per_kvp_group=draw(st.sampled_from([None, 4096])) if kvp > 1 else None,
        pp_stages=draw(st.sampled_from([1, 2, 3])),
        spp=draw(st.booleans()),
        num_blocks=draw(st.integers(600, 2000)),
        target_batch_time=0.05,
        max_batch_size=draw(st.integers(4, 64)),
        long_prefill_threshold=4096,
    )
    return Setup(
        config, draw(st.integers(1, 3)), draw(st.sampled_from(["round-robin", "least-loaded"]))
    )


@st.composite
def request_lists(draw: st.DrawFn) -> list[SimRequest]:
    count = draw(st.integers(1, 25))
    times = sorted(draw(st.lists(st.floats(0, 5), min_size=count, max_size=count)))
    return [
        SimRequest(
            f"q{i}",
            arrival,
            draw(st.integers(1, 7000)),
            draw(st.integers(1, 40)),
            draw(st.sampled_from([None, 0.2, 3.0])),
        )
        for i, arrival in enumerate(times)
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), requests=request_lists())
def test_every_request_finishes_and_every_block_is_freed(
    setup: Setup, requests: list[SimRequest]
) -> None:
    cost = ToyCost(pp_stages=setup.config.pp_stages)
    simulator = Simulator(
        setup.config,
        cost,
        num_replicas=setup.replicas,
        routing=setup.routing,  # type: ignore[arg-type]
    )
    result = simulator.run(requests)
    assert_conserved(result, requests)
    assert result.end_time == max(r.finish_time for r in result.records)


def test_requests_that_can_never_fit_are_reported_not_fatal() -> None:
    small = Deployment(LLAMA_3_8B, A100_80GB, ReplicaSpec(tp=1))
    requests = [
        SimRequest("huge", 0.0, 2_000_000, 4, label="long"),
        SimRequest("ok", 0.1, 500, 4),
        SimRequest("also-huge", 0.2, 3_000_000, 4, label="other"),
    ]
    result = simulate(small, requests)
    assert list(result.rejected) == ["huge", "also-huge"] and "KV" in result.rejected["huge"]
    assert [r.request_id for r in result.records] == ["ok"]
    # Counted under their own labels, which are listed though none of theirs finished.
    assert result.labels == ["long", "other", "short"]
    assert [result.rejected_count(label) for label in (None, "long", "short")] == [2, 1, 0]
    runs = [PolicyRun("lars", result)]
    by_label = results_json({}, runs)["policies"]["lars"]["rejected_by_label"]
    assert by_label == {"long": 1, "other": 1, "short": 0}
    assert results_table(runs, label="short").columns[1]._cells == ["1"]
    assert results_table(runs, label="long").columns[1]._cells == ["0 (+1 rejected)"]


# -- executor, routing, capacity ------------------------------------------------------------


def test_a_pipeline_serves_plans_in_order_and_frees_stage_zero_after_one_stage_time() -> None:
    pipeline = PipelineExecutor(pp_stages=2)
    assert pipeline.issue(0.0, 1.0, 2.0) == (1.0, 2.0)
    # The next plan enters stage 0 at once, waits for stage 1, and finishes after the first.
    assert pipeline.issue(1.0, 0.5, 1.0) == (1.5, 2.5)
    # It moves on after its mean stage time (1.5 s), but holds each stage for 2 s...
    assert pipeline.issue(1.5, 2.0, 3.0) == (3.5, 4.5)
    # ... so the next one waits for stage 1 until 5.0.
    assert pipeline.issue(3.5, 1.0, 2.0) == (4.5, 6.0)
    assert pipeline.busy_time == pytest.approx(4.5)


def test_a_plan_alone_in_a_pipeline_of_uneven_stages_takes_its_batch_time() -> None:
    # Two stages of 1.0 s and 0.5 s: the slowest stage's time is 1.0, the batch's 1.5.
    pipeline = PipelineExecutor(pp_stages=2)
    assert pipeline.issue(0.0, 1.0, 1.5) == (1.0, 1.5)


@dataclass(frozen=True)
class SlowerBy:
    """A cost model whose every batch takes `factor` times what `inner` predicts."""

    inner: ToyCost
    factor: float

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.inner.batch_time(seqs) * self.factor

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.inner.stage_time(seqs) * self.factor

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.inner.prefill_time(prompt_tokens) * self.factor

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        return self.inner.remaining_prefill_time(processed_tokens, prompt_tokens) * self.factor


def test_the_executor_runs_plans_in_their_predicted_time_unless_given_another_cost() -> None:
    cost = ToyCost(pp_stages=2)
    config = SchedulerConfig(pp_stages=2, kvp_groups=2, max_tokens_per_kvp_group=4096)
    requests = [SimRequest(f"q{i}", 0.1 * i, 3000 + 400 * i, 20) for i in range(12)]
    predicted = Simulator(config, cost).run(requests)
    repriced = Simulator(config, cost, executor_cost=cost).run(requests)
    assert repriced.records == predicted.records
    slower = Simulator(config, cost, executor_cost=SlowerBy(cost, 1.5)).run(requests)
    assert_conserved(slower, requests)
    assert slower.summary().ttft_p50 > predicted.summary().ttft_p50
    assert slower.end_time > predicted.end_time


def test_round_robin_alternates_and_least_loaded_avoids_the_busy_replica() -> None:
    config = SchedulerConfig(num_blocks=20_000)
    requests = [SimRequest("long", 0.0, 100_000, 4)]
    requests += [SimRequest(f"s{i}", 0.01 * (i + 1), 500, 4) for i in range(6)]
    replica_of = {}
    for routing in ("round-robin", "least-loaded"):
        result = Simulator(config, ToyCost(), num_replicas=2, routing=routing).run(requests)
        replica_of[routing] = {r.request_id: r.replica for r in result.records}
    assert [replica_of["round-robin"][f"s{i}"] for i in range(6)] == [1, 0, 1, 0, 1, 0]
    assert replica_of["least-loaded"]["long"] == 0
    assert all(replica_of["least-loaded"][f"s{i}"] == 1 for i in range(6))


def test_kv_capacity_is_gpu_memory_after_weights_over_kv_bytes_per_token() -> None:
    # Llama-3-8B, one A100: (0.9 x 80 GB - 16 GB of weights) / 128 KiB of KV per token.
    one = Deployment(LLAMA_3_8B, A100_80GB, ReplicaSpec())
    assert 420_000 < one.kv_tokens_per_group() < 435_000
    # TP8 x PP2: each GPU holds 1/16 of the weights and 1/16 of each token's KV.
    paper = Deployment(LLAMA_3_8B, A100_80GB, ReplicaSpec(tp=8, pp=2))
    assert 8_400_000 < paper.kv_tokens_per_group() < 8_800_000
    assert paper.scheduler_config().num_blocks == paper.kv_tokens_per_group() // 16
    assert paper.num_gpus == 16
