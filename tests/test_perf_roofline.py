"""Per-op work formulas of the roofline model, checked against hand-computed values."""

from __future__ import annotations

import pytest

from medha.perf.hardware import H100_80GB
from medha.perf.roofline import (
    Terms,
    allgather_wire_bytes,
    attention_work,
    elementwise_bytes,
    linear_work,
    ring_allreduce_wire_bytes,
)


def test_linear_work_counts_two_flops_per_weight_per_token_and_reads_weights_once() -> None:
    work = linear_work(tokens=8, in_features=4096, out_features=1024, dtype_bytes=2)
    assert work.flops == 2 * 8 * 4096 * 1024
    assert work.bytes == (4096 * 1024 + 8 * (4096 + 1024)) * 2


def test_attention_of_a_chunk_over_a_prefix_is_causal_within_the_chunk() -> None:
    # 32 queries over 1000 cached tokens: query j sees 1000 + j + 1 keys, on average 1016.5.
    work = attention_work(32, 1000, q_heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    assert work.flops == 4 * 32 * 1016.5 * 32 * 128
    kv_bytes = (1000 + 32) * 2 * 8 * 128 * 2
    qo_bytes = 2 * 32 * 32 * 128 * 2
    assert work.bytes == kv_bytes + qo_bytes


def test_decode_attention_reads_the_whole_kv_cache_for_one_query() -> None:
    work = attention_work(1, 4095, q_heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    assert work.flops == 4 * 4096 * 32 * 128
    # K and V of 4096 tokens dominate: ~16 MiB per layer.
    assert work.bytes == pytest.approx(4096 * 2 * 8 * 128 * 2, rel=1e-3)


def test_attention_arithmetic_intensity_is_chunk_times_gqa_ratio_at_long_context() -> None:
    # DESIGN section 2: intensity ~ c * h_q / h_kv FLOP/byte, independent of the context length.
    for kv in (100_000, 1_000_000):
        work = attention_work(32, kv, q_heads=32, kv_heads=8, head_dim=128, dtype_bytes=2)
        assert work.flops / work.bytes == pytest.approx(32 * 4, rel=0.01)


def test_elementwise_traffic_covers_norms_residuals_rope_and_gating() -> None:
    got = elementwise_bytes(
        10, hidden=4096, q_dim=4096, kv_dim=1024, intermediate=14336, dtype_bytes=2
    )
    assert got == 10 * (10 * 4096 + 2 * (4096 + 1024) + 3 * 14336) * 2


def test_ring_all_reduce_sends_two_times_n_minus_one_over_n_of_the_message() -> None:
    assert ring_allreduce_wire_bytes(800.0, 8) == 2 * 7 / 8 * 800
    assert ring_allreduce_wire_bytes(800.0, 1) == 0.0


def test_all_gather_receives_every_other_ranks_share() -> None:
    assert allgather_wire_bytes(100.0, 4) == 300.0
    assert allgather_wire_bytes(100.0, 1) == 0.0


def test_terms_seconds_divide_each_ideal_term_by_its_efficiency_and_add_overheads() -> None:
    eff = H100_80GB.efficiency
    terms = Terms(
        matmul=1.0,
        attention=2.0,
        memory=3.0,
        kv_read=4.0,
        collective=5.0,
        latency=0.5,
        layers=32,
        sequence_layers=64,
        iterations=1,
    )
    expected = (
        1.0 / eff.matmul
        + 2.0 / eff.attention
        + 3.0 / eff.memory
        + 4.0 / eff.kv_read
        + 5.0 / eff.collective
        + 0.5
        + 32 * eff.layer_overhead_s
        + 64 * eff.sequence_overhead_s
        + eff.iteration_overhead_s
    )
    assert terms.seconds(eff) == pytest.approx(expected)
    assert sum(terms.seconds_by_term(eff).values()) == pytest.approx(expected)


def test_terms_add_and_scale_fieldwise() -> None:
    a = Terms(matmul=1.0, layers=2, iterations=1)
    b = Terms(memory=3.0, latency=0.25, sequence_layers=4)
    total = (a + b).scaled(2)
    assert total == Terms(
        matmul=2.0, memory=6.0, latency=0.5, layers=4, sequence_layers=8, iterations=2
    )
