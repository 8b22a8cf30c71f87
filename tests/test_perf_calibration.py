"""Calibration recovers a device profile from timings, and profiles persist as JSON."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from medha.perf import (
    CPU,
    H100_80GB,
    LLAMA_3_8B,
    SMOLLM2_135M,
    DeviceProfile,
    Efficiency,
    Measurement,
    ReplicaSpec,
    RooflineCostModel,
    fit_profile,
    load_profile,
    save_profile,
)
from medha.perf.hardware import EFFICIENCY_TERMS
from medha.perf.nnls import nnls
from medha.scheduler.cost import SeqShape

S = SeqShape
GPU_TRUTH = H100_80GB.with_efficiency(
    dataclasses.replace(
        H100_80GB.efficiency,
        matmul=0.6,
        attention=0.45,
        memory=0.78,
        kv_read=0.88,
        collective=0.6,
        iteration_overhead_s=2e-3,
        layer_overhead_s=20e-6,
    )
)
CPU_TRUTH = CPU.with_efficiency(
    Efficiency(
        matmul=0.3,
        attention=0.1,
        memory=0.5,
        kv_read=0.2,
        collective=1.0,
        iteration_overhead_s=5e-3,
        sequence_overhead_s=50e-6,
        kv_gather_s=3e-7,
    )
)


def gpu_grid() -> list[list[SeqShape]]:
    grid = [[S(1, kv)] * n for n in (1, 4, 16, 64) for kv in (0, 4096, 65536, 262144)]
    for chunk in (32, 128, 512, 2048, 8192):
        for kv in (0, 16384, 131072, 524288):
            grid += [[S(chunk, kv)], [S(chunk, kv)] + [S(1, 8192)] * 16]
    return grid


def cpu_grid() -> list[list[SeqShape]]:
    grid = [[S(1, kv)] * n for n in (1, 2, 4, 8, 16) for kv in (0, 256, 1024, 4096)]
    for chunk in (16, 64, 256, 1024):
        for kv in (0, 1024, 4096):
            grid += [[S(chunk, kv)], [S(chunk, kv)] + [S(1, 512)] * 4]
    return grid


def timings(
    cost: RooflineCostModel, grid: list[list[SeqShape]], noise: float, seed: int = 0
) -> list[Measurement]:
    rng = random.Random(seed)
    return [Measurement(b, cost.batch_time(b) * (1 + rng.gauss(0, noise))) for b in grid]


def efficiencies(profile: DeviceProfile) -> dict[str, float]:
    return {name: float(getattr(profile.efficiency, name)) for name in EFFICIENCY_TERMS}


def fixed_overhead(profile: DeviceProfile, layers: int) -> float:
    eff = profile.efficiency
    return eff.iteration_overhead_s + layers * eff.layer_overhead_s


def test_nnls_solves_a_consistent_system_exactly() -> None:
    rows = [[1.0, 2.0], [3.0, 1.0], [0.5, 4.0], [2.0, 2.0]]
    truth = [0.7, 1.3]
    targets = [r[0] * truth[0] + r[1] * truth[1] for r in rows]
    assert nnls(rows, targets) == pytest.approx(truth, rel=1e-9)


def test_nnls_clamps_coefficients_that_least_squares_would_make_negative() -> None:
    rows = [[1.0, 0.0], [0.0, 1.0]]
    assert nnls(rows, [2.0, -3.0]) == pytest.approx([2.0, 0.0])


@pytest.mark.parametrize(
    "replica", [ReplicaSpec(tp=2), ReplicaSpec(tp=2, pp=2), ReplicaSpec(tp=2, pp=4)], ids=str
)
def test_noise_free_timings_recover_the_true_gpu_profile(replica: ReplicaSpec) -> None:
    # With pipeline stages a batch pays the per-iteration overhead once per stage but each
    # layer's once: the fit must still split them right.
    measured = timings(RooflineCostModel(LLAMA_3_8B, GPU_TRUTH, replica), gpu_grid(), noise=0)
    fit = fit_profile(measured, H100_80GB, LLAMA_3_8B, replica)
    assert efficiencies(fit.profile) == pytest.approx(efficiencies(GPU_TRUTH), rel=1e-6)
    assert fixed_overhead(fit.profile, 32) == pytest.approx(fixed_overhead(GPU_TRUTH, 32))
    assert fit.median_abs_rel_error < 1e-9
    assert fit.profile.calibrated


def test_noisy_timings_recover_gpu_efficiencies_within_a_few_percent() -> None:
    replica = ReplicaSpec(tp=2)
    truth = RooflineCostModel(LLAMA_3_8B, GPU_TRUTH, replica)
    fit = fit_profile(timings(truth, gpu_grid(), noise=0.01), H100_80GB, LLAMA_3_8B, replica)
    assert efficiencies(fit.profile) == pytest.approx(efficiencies(GPU_TRUTH), rel=0.03)
    assert fixed_overhead(fit.profile, 32) == pytest.approx(fixed_overhead(GPU_TRUTH, 32), rel=0.1)
    assert fit.median_abs_rel_error < 0.015


def test_cpu_profile_is_fitted_from_nominal_units_and_predicts_unseen_batches() -> None:
    truth = RooflineCostModel(SMOLLM2_135M, CPU_TRUTH, dtype_bytes=4)
    fit = fit_profile(timings(truth, cpu_grid(), noise=0.01), CPU, SMOLLM2_135M, dtype_bytes=4)
    assert not CPU.calibrated and fit.profile.calibrated
    fitted = efficiencies(fit.profile)
    for name in ("matmul", "attention", "memory", "kv_read"):
        assert fitted[name] == pytest.approx(efficiencies(CPU_TRUTH)[name], rel=0.03)
    # The KV gather pass is what a prefill chunk over a long prefix pays beyond its FLOPs.
    assert fit.profile.efficiency.kv_gather_s == pytest.approx(3e-7, rel=0.1)
    assert "collective" in fit.held  # one process: no collective to learn from
    assert fitted["collective"] == CPU.efficiency.collective

    fitted_cost = RooflineCostModel(SMOLLM2_135M, fit.profile, dtype_bytes=4)
    for batch in ([S(1, 2000)] * 3, [S(300, 700), S(1, 100)], [S(48, 3000)] * 2):
        assert fitted_cost.batch_time(batch) == pytest.approx(truth.batch_time(batch), rel=0.02)


def test_only_the_requested_coefficients_are_fitted() -> None:
    truth = RooflineCostModel(LLAMA_3_8B, GPU_TRUTH)
    fit = fit_profile(timings(truth, gpu_grid(), noise=0), H100_80GB, LLAMA_3_8B, free=("matmul",))
    assert fit.fitted == ("matmul",)
    got, base = efficiencies(fit.profile), efficiencies(H100_80GB)
    assert {k: v for k, v in got.items() if k != "matmul"} == {
        k: v for k, v in base.items() if k != "matmul"
    }
    assert got["matmul"] != base["matmul"]


def test_fit_rejects_unknown_coefficients_and_empty_input() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        fit_profile([Measurement([S(1, 0)], 0.01)], H100_80GB, LLAMA_3_8B, free=("warp_speed",))
    with pytest.raises(ValueError):
        fit_profile([], H100_80GB, LLAMA_3_8B)
    with pytest.raises(ValueError):
        Measurement([S(1, 0)], 0.0)


def test_profiles_round_trip_through_json(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    save_profile(GPU_TRUTH, path)
    assert load_profile(path) == GPU_TRUTH
    assert json.loads(path.read_text())["efficiency"]["matmul"] == 0.6


def test_loading_a_profile_with_unknown_or_missing_keys_fails_clearly() -> None:
    data = json.loads(H100_80GB.to_json())
    data["turbo"] = True
    with pytest.raises(ValueError, match="unknown keys \\['turbo'\\]"):
        DeviceProfile.from_json(json.dumps(data))
    data = json.loads(H100_80GB.to_json())
    del data["efficiency"]["matmul"]
    with pytest.raises(ValueError, match="missing keys \\['matmul'\\]"):
        DeviceProfile.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("peak_flops", True, "peak_flops must be a number, got True"),
        ("hbm_bandwidth", "fast", "must be a number"),
        ("gpus_per_node", 1.5, "gpus_per_node must be an int"),
        ("calibrated", "yes", "calibrated must be a bool"),
        ("name", 3, "name must be a str"),
    ],
)
def test_a_profile_field_of_the_wrong_type_is_refused(
    field: str, value: object, message: str
) -> None:
    data = json.loads(H100_80GB.to_json())
    data[field] = value
    with pytest.raises(ValueError, match=message):
        DeviceProfile.from_json(json.dumps(data))


@pytest.mark.parametrize("term", ["matmul", "iteration_overhead_s"])
def test_an_infinite_coefficient_is_refused(term: str) -> None:
    data = json.loads(H100_80GB.to_json())
    data["efficiency"][term] = float("inf")  # json writes Infinity, and reads it back
    with pytest.raises(ValueError, match=f"{term} must be finite"):
        DeviceProfile.from_json(json.dumps(data))


def test_saving_a_profile_never_leaves_a_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "profile.json"
    save_profile(GPU_TRUTH, path)

    def disk_full(self: Path, *args: object, **kwargs: object) -> None:
        Path.open(self, "w").close()  # the truncation a plain write_text does first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_profile(H100_80GB, path)
    monkeypatch.undo()
    assert load_profile(path) == GPU_TRUTH
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]
