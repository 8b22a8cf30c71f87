"""Built-in model presets and device profiles say what their sources say."""

from __future__ import annotations

import pytest

from medha.perf import (
    A100_80GB,
    CPU,
    DEVICE_PROFILES,
    H100_80GB,
    H200,
    LLAMA_3_8B,
    LLAMA_3_70B,
    SMOLLM2_135M,
    DeviceProfile,
    Efficiency,
    ReplicaSpec,
    device_profile,
    model_preset,
)


@pytest.mark.parametrize(
    ("name", "params"),
    [("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9), ("smollm2-135m", 134.5e6)],
)
def test_presets_have_the_published_parameter_counts(name: str, params: float) -> None:
    assert model_preset(name).num_parameters == pytest.approx(params, rel=0.005)


def test_presets_use_grouped_query_attention_as_published() -> None:
    assert (LLAMA_3_8B.q_per_kv, LLAMA_3_70B.q_per_kv, SMOLLM2_135M.q_per_kv) == (4, 8, 3)
    assert SMOLLM2_135M.tie_word_embeddings and not LLAMA_3_8B.tie_word_embeddings
    # Llama-3-8B caches 128 KiB of K/V per token in bf16: 1M tokens need ~131 GB.
    assert LLAMA_3_8B.kv_bytes_per_token(2) == 131072


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="llama-3-8b"):
        model_preset("gpt-5")
    with pytest.raises(ValueError, match="h100-80gb"):
        device_profile("tpu-v5")
    assert model_preset("Llama-3-8B") is LLAMA_3_8B
    assert device_profile("H200") is H200


def test_gpu_profiles_carry_datasheet_peaks() -> None:
    assert A100_80GB.peak_flops == 312e12 and A100_80GB.hbm_bandwidth == 2039e9
    assert H100_80GB.peak_flops == 989e12 and H100_80GB.hbm_bandwidth == 3350e9
    assert H200.peak_flops == H100_80GB.peak_flops and H200.hbm_bandwidth == 4800e9
    assert H100_80GB.efficiency.kv_read == 0.92  # the Medha paper's decode MBU
    assert all(p.calibrated is False for p in DEVICE_PROFILES.values())


def test_cpu_profile_is_marked_uncalibrated_and_neutral() -> None:
    assert CPU.calibrated is False
    assert CPU.efficiency == Efficiency(1.0, 1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("profile", list(DEVICE_PROFILES.values()))
def test_every_builtin_profile_survives_json(profile: DeviceProfile) -> None:
    assert DeviceProfile.from_json(profile.to_json()) == profile


def test_efficiencies_must_be_positive_and_overheads_non_negative() -> None:
    with pytest.raises(ValueError, match="matmul"):
        Efficiency(0.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="iteration_overhead_s"):
        Efficiency(1.0, 1.0, 1.0, 1.0, 1.0, iteration_overhead_s=-1.0)


def test_replica_places_collectives_on_nvlink_only_within_a_node() -> None:
    tp8 = ReplicaSpec(tp=8, pp=2)
    assert tp8.tp_spans_one_node(8) and not tp8.pp_neighbours_share_node(8)
    small = ReplicaSpec(tp=2, pp=2, kvp=2, kvp_max_tokens_per_group=1000)
    assert small.kvp_spans_one_node(8) and small.pp_neighbours_share_node(8)
    assert ReplicaSpec(pp=3).layers_per_stage(32) == [11, 11, 10]
    assert small.kvp_groups_at(999) == 1 and small.kvp_groups_at(1000) == 2
    assert small.kvp_groups_at(10**6) == 2
