"""The roofline cost model: hand-checked terms, parallelism effects, and monotonicity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.model.arch import ModelArch
from medha.perf import (
    A100_80GB,
    H100_80GB,
    LLAMA_3_8B,
    LLAMA_3_70B,
    SMOLLM2_135M,
    DeviceProfile,
    ReplicaSpec,
    RooflineCostModel,
)
from medha.scheduler.cost import BatchCostModel, SeqShape, head_only

S = SeqShape
MILLION = 1_000_000


def model(
    arch: ModelArch = LLAMA_3_8B,
    profile: DeviceProfile = H100_80GB,
    tp: int = 1,
    pp: int = 1,
    kvp: int = 1,
) -> RooflineCostModel:
    shard = MILLION // kvp if kvp > 1 else None
    return RooflineCostModel(arch, profile, ReplicaSpec(tp, pp, kvp, shard))


def test_roofline_model_satisfies_the_scheduler_protocol() -> None:
    cost: BatchCostModel = model()
    assert cost.batch_time([S(1, 0)]) > 0


def test_single_decode_of_llama_3_8b_is_the_weight_read_16gb_over_2tbs() -> None:
    arch, hw = LLAMA_3_8B, A100_80GB
    h, kv_dim = arch.hidden_size, arch.num_kv_heads * arch.head_dim
    per_layer = h * (h + 2 * kv_dim) + h * h + 3 * h * arch.intermediate_size
    weight_bytes = (arch.num_layers * per_layer + arch.vocab_size * h) * 2  # ~15 GB, bf16
    eff = hw.efficiency
    expected = (
        weight_bytes / (hw.hbm_bandwidth * eff.memory)
        + eff.iteration_overhead_s
        + arch.num_layers * eff.layer_overhead_s
    )
    got = model(profile=hw).batch_time([S(1, 0)])
    assert got == pytest.approx(expected, rel=0.01)
    assert 0.008 < got < 0.011


@pytest.mark.parametrize("tp", [1, 3])
def test_scored_rows_add_the_lm_heads_matmul_and_logits_on_every_row(tp: int) -> None:
    # prompt_logprobs: a 256-row chunk of SmolLM2 (bf16) scored. Its head is compute-bound,
    # 2 x 576 x 49,152 / tp FLOPs a row; every row's logits are cast to fp32, all-gathered
    # across the TP ranks and read once more. Unscored, its one row is memory-bound: the read
    # of the head's weights.
    arch, hw = SMOLLM2_135M, A100_80GB
    h, vocab, shard = arch.hidden_size, arch.vocab_size, arch.vocab_size // tp
    eff = hw.efficiency
    cost = model(arch, hw, tp=tp)
    plain = cost.breakdown([S(256, 0)])
    scored = cost.breakdown([S(256, 0, 1, 256)])
    assert scored["matmul"] - plain["matmul"] == pytest.approx(
        2 * 256 * h * shard / (hw.peak_flops * eff.matmul)
    )
    logits_per_row = shard * (2 + 4) + vocab * 4 * (2 if tp > 1 else 1)
    one_row_gemm = (h * shard + h + shard) * 2
    assert scored["memory"] - plain["memory"] == pytest.approx(
        (255 * logits_per_row - one_row_gemm) / (hw.hbm_bandwidth * eff.memory)
    )
    gathered = (tp - 1) * 255 * shard * 4  # more bytes each rank receives
    assert scored["collective"] - plain["collective"] == pytest.approx(
        gathered / (hw.nvlink_bandwidth * eff.collective)
    )


def test_a_scored_chunks_logits_outweigh_its_head_matmul_at_tp8() -> None:
    # Llama-3-8B on H100s at tp 8, 2,048 scored rows: the head's matmul is an eighth of the
    # vocabulary, but every rank receives and reads the whole fp32 logits, ~1 GB.
    plain = model(tp=8).breakdown([S(2048, 0)])
    scored = model(tp=8).breakdown([S(2048, 0, 1, 2048)])
    extra = {term: scored[term] - plain[term] for term in scored}
    assert extra["memory"] + extra["collective"] > 2 * extra["matmul"] > 0


def test_tensor_parallelism_halves_matmul_time_and_adds_two_all_reduces_per_layer() -> None:
    batch = [S(4096, 0)]  # compute-bound GEMMs
    one, two = model(tp=1).breakdown(batch), model(tp=2).breakdown(batch)
    assert two["matmul"] == pytest.approx(one["matmul"] / 2, rel=1e-9)
    assert one["collective"] == one["latency"] == 0.0
    hw, arch = H100_80GB, LLAMA_3_8B
    ring = 2 * (2 - 1) / 2 * 4096 * arch.hidden_size * 2
    # ... and, once, the all-gather of the sampled row's fp32 logits (half the vocabulary each).
    logits = arch.vocab_size // 2 * 4
    expected = (arch.num_layers * 2 * ring + logits) / (
        hw.nvlink_bandwidth * hw.efficiency.collective
    )
    assert two["collective"] == pytest.approx(expected, rel=1e-9)
    assert two["latency"] == pytest.approx((arch.num_layers * 2 + 1) * hw.nvlink_latency_s)


def test_pipeline_stage_time_is_about_batch_time_over_pp() -> None:
    batch = [S(2048, 100_000)] + [S(1, 4096)] * 32
    cost = model(LLAMA_3_70B, tp=8, pp=4)
    assert cost.stage_time(batch) == pytest.approx(cost.batch_time(batch) / 4, rel=0.05)
    flat = model(LLAMA_3_70B, tp=8, pp=1)
    assert flat.stage_time(batch) == flat.batch_time(batch)


def test_pipeline_stages_send_hidden_states_across_nodes() -> None:
    batch = [S(1024, 0)]
    one, two = model(tp=8, pp=1), model(tp=8, pp=2)
    send = 1024 * LLAMA_3_8B.hidden_size * 2 / H100_80GB.network_bandwidth  # TP8 fills a node
    extra = two.batch_terms(batch).collective - one.batch_terms(batch).collective
    assert extra == pytest.approx(send, rel=1e-9)


def test_uneven_pipeline_is_as_slow_as_its_stage_with_most_layers() -> None:
    cost = model(tp=1, pp=3)  # 32 layers: 11 + 11 + 10
    batch = [S(2048, 500_000)]  # per-layer attention dominates everything else
    assert cost.stage_time(batch) == pytest.approx(cost.batch_time(batch) * 11 / 32, rel=0.02)


def test_kv_parallelism_lowers_decode_time_at_a_million_tokens() -> None:
    one = model(tp=8).batch_time([S(1, MILLION)])
    # Each of the two groups holds half of the KV and prices its own shard.
    two_terms = model(tp=8, kvp=2).breakdown([S(1, MILLION // 2, 2)])
    two = sum(two_terms.values())
    assert two < 0.85 * one
    assert two_terms["collective"] > 0  # the partial-attention merge is charged


def test_decode_over_long_context_is_bound_by_kv_reads() -> None:
    terms = model(tp=8).breakdown([S(1, MILLION)])
    assert terms["kv_read"] > 0.5 * sum(terms.values())
    assert terms["attention"] == 0.0


def test_small_chunks_at_a_million_tokens_cost_little_more_per_token_than_large_ones() -> None:
    # DESIGN section 2: with GQA, a 32-token chunk at 1M context is near compute-bound.
    cost = model(LLAMA_3_8B, H100_80GB, tp=1)
    small = cost.batch_time([S(32, MILLION)]) / 32
    large = cost.batch_time([S(2048, MILLION)]) / 2048
    assert 1.05 <= small / large <= 1.25


def test_attention_per_token_grows_with_context_so_budgeted_chunks_shrink() -> None:
    cost = model()
    per_token = [cost.batch_time([S(512, kv)]) / 512 for kv in (0, 100_000, MILLION)]
    assert per_token[0] < per_token[1] < per_token[2]


def test_breakdown_sums_to_batch_time() -> None:
    cost = model(tp=8, pp=2, kvp=2)
    batch = [S(256, 700_000, 1), S(1, 1_500_000, 2), S(1, 100)]
    assert sum(cost.breakdown(batch).values()) == pytest.approx(cost.batch_time(batch))


def test_empty_batch_takes_no_time() -> None:
    assert model().batch_time([]) == 0.0
    assert model().stage_time([]) == 0.0


def test_any_model_arch_works_including_odd_head_counts() -> None:
    cost = RooflineCostModel(SMOLLM2_135M, A100_80GB, ReplicaSpec(tp=3))
    assert cost.batch_time([S(128, 1000), S(1, 50)]) > 0


@pytest.mark.parametrize(
    ("replica", "message"),
    [
        (ReplicaSpec(tp=5), "tp=5 does not divide"),
        (ReplicaSpec(pp=40), "pp=40 exceeds"),
    ],
)
def test_replicas_that_cannot_shard_the_model_are_rejected(
    replica: ReplicaSpec, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RooflineCostModel(LLAMA_3_8B, H100_80GB, replica)


def test_kvp_groups_without_a_shard_size_never_spread_a_request() -> None:
    replicas = ReplicaSpec(kvp=2)  # data-parallel groups only
    assert replicas.kvp_groups_at(10**9) == 1
    assert ReplicaSpec(kvp=2, kvp_max_tokens_per_group=100).kvp_groups_at(150) == 2
    with pytest.raises(ValueError, match="kvp_max_tokens_per_group"):
        ReplicaSpec(kvp=2, kvp_max_tokens_per_group=0)


def test_a_head_only_shape_costs_the_lm_head_at_the_last_stage_and_no_layer() -> None:
    # The sampling KVP group runs the LM head for a sequence another group ran (head_only);
    # that group runs the layers without the head (head_rows=0). A decode's head row reads
    # the head's weights: 1 GB of Llama-3-8B's 16.
    cost = model(pp=2, kvp=2)
    eff, arch = cost.profile.efficiency, cost.arch
    overhead = eff.iteration_overhead_s
    decode, layers_only = S(1, 5000, 1, 1), S(1, 5000, 1, 0)
    head = cost.batch_time([decode]) - cost.batch_time([layers_only])
    weights_read = arch.vocab_size * arch.hidden_size * 2 / (H100_80GB.hbm_bandwidth * eff.memory)
    assert head == pytest.approx(weights_read, rel=0.01)
    assert cost.batch_time([head_only(1)]) == pytest.approx(2 * overhead + head)
    assert cost.stage_time([head_only(1)]) == pytest.approx(overhead + head)
    assert cost.batch_time([layers_only, head_only(1)]) == pytest.approx(cost.batch_time([decode]))
    rows = cost.batch_time([head_only(300)]) - cost.batch_time([head_only(1)])
    assert rows > 0


@pytest.mark.parametrize(
    "bad",
    [S(-1, 0), S(1, -5), S(1, 10, 2), S(1, 10, 0), S(4, 0, 1, -1), S(0, 5), S(0, 0, 2, 1)],
)
def test_malformed_sequences_are_rejected(bad: SeqShape) -> None:
    with pytest.raises(ValueError):
        model().batch_time([bad])


replicas = st.sampled_from(
    [
        ReplicaSpec(1, 1, 1),
        ReplicaSpec(8, 1, 1),
        ReplicaSpec(2, 4, 1),
        ReplicaSpec(8, 2, 2, 300_000),
        ReplicaSpec(4, 1, 4, 100_000),
    ]
)
profiles = st.sampled_from([A100_80GB, H100_80GB])


@st.composite
def shapes(draw: st.DrawFn, kvp: int) -> SeqShape:
    return S(
        draw(st.integers(1, 8192)),
        draw(st.integers(0, 2 * MILLION)),
        draw(st.integers(1, kvp)),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[RooflineCostModel, list[SeqShape]]:
    replica = draw(replicas)
    cost = RooflineCostModel(LLAMA_3_70B, draw(profiles), replica)
    return cost, draw(st.lists(shapes(replica.kvp), min_size=1, max_size=12))


@settings(max_examples=150, deadline=None)
@given(cases(), st.integers(0, 11), st.integers(1, 4096), st.integers(1, 500_000))
def test_more_tokens_never_make_a_batch_cheaper(
    case: tuple[RooflineCostModel, list[SeqShape]], index: int, more_q: int, more_kv: int
) -> None:
    cost, batch = case
    i = index % len(batch)
    seq = batch[i]
    longer_chunk = [*batch[:i], S(seq.q_tokens + more_q, seq.kv_tokens, seq.kvp_groups)]
    longer_context = [*batch[:i], S(seq.q_tokens, seq.kv_tokens + more_kv, seq.kvp_groups)]
    unchanged = batch[: i + 1]
    for time in (cost.batch_time, cost.stage_time):
        assert time(longer_chunk) >= time(unchanged)
        assert time(longer_context) >= time(unchanged)
        assert time(batch) >= time(unchanged)  # more sequences


@settings(max_examples=100, deadline=None)
@given(cases())
def test_a_stage_never_takes_longer_than_the_whole_batch(
    case: tuple[RooflineCostModel, list[SeqShape]],
) -> None:
    cost, batch = case
    assert 0 < cost.stage_time(batch) <= cost.batch_time(batch) * (1 + 1e-12)


@settings(max_examples=50, deadline=None)
@given(
    prior=st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 200_000)), max_size=4),
    contexts=st.lists(st.integers(0, 2_000_000), max_size=40),
    heads=st.booleans(),
)
def test_bulk_decode_pricing_gives_the_same_sums_bit_for_bit(
    prior: list[tuple[int, int]], contexts: list[int], heads: bool
) -> None:
    # The scheduler prices a group's decodes in one call; it must equal one add per decode,
    # whatever the batch held before (a prefill chunk, say). `heads` False: a group whose
    # LM-head rows the sampling group runs.
    cost = model()
    one_by_one, bulk = cost.batch_pricer(), cost.batch_pricer()
    for q, kv in prior:
        one_by_one.add(SeqShape(q, kv, 1))
        bulk.add(SeqShape(q, kv, 1))
    for kv in contexts:
        one_by_one.add(SeqShape(1, kv, 1, 1 if heads else 0))
    bulk.add_decodes(contexts, heads=heads)
    assert bulk._sums == one_by_one._sums  # every term, kv_tokens included
    assert bulk.time() == one_by_one.time()
    assert bulk.stage_time() == one_by_one.stage_time()


def test_bulk_decode_pricing_rejects_negative_contexts() -> None:
    with pytest.raises(ValueError, match="kv_tokens"):
        model().batch_pricer().add_decodes([5, -1])
