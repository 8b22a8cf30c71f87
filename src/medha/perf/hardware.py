"""Device profiles: what one accelerator can do at peak, and what fraction of it real kernels get.

A profile is the hardware's datasheet numbers (peak dense bf16 FLOP/s, HBM bandwidth, link
bandwidths) times efficiency coefficients. Datasheet numbers never change; the coefficients are
the knobs that calibration (medha.perf.calibration) fits to measured step times, and that
`save_profile` / `load_profile` persist as JSON.

Bandwidths are per GPU and per direction (what one GPU can push into the link while it also
receives), which is what ring collectives and point-to-point sends are limited by.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9
TFLOPS = 1e12
US = 1e-6
MS = 1e-3


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak, and fixed overheads, for each additive term of the cost model.

    The model's time is `sum(ideal_seconds[term] / efficiency[term]) + overheads`, so every field
    here enters linearly (as 1/efficiency or as seconds): that is what calibration fits.
    """

    matmul: float
    """Fraction of peak FLOP/s achieved by GEMMs (projections, MLP, lm head) when compute-bound."""
    attention: float
    """Fraction of peak FLOP/s achieved by prefill attention kernels when compute-bound."""
    memory: float
    """Fraction of HBM bandwidth achieved when streaming weights and activations."""
    kv_read: float
    """Fraction of HBM bandwidth achieved by attention reading the KV cache (decode MBU)."""
    collective: float
    """Fraction of link bandwidth achieved by NCCL all-reduce / send / all-gather."""
    layer_overhead_s: float = 0.0
    """Seconds per decoder layer per iteration (kernel launches that do not overlap compute)."""
    iteration_overhead_s: float = 0.0
    """Seconds per iteration and pipeline stage (input preparation, sampling, host
    synchronisation: each stage's worker pays it for every plan)."""
    sequence_overhead_s: float = 0.0
    """Seconds per sequence per layer (per-sequence attention setup; ~0 with one varlen kernel)."""
    kv_gather_s: float = 0.0
    """Seconds per cached KV token per layer copied out of the paged cache before attention:
    0 for kernels that read paged KV in place (GPU), the gather pass of the CPU executor."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in EFFICIENCY_TERMS:
            if not getattr(self, name) > 0:
                raise ValueError(f"efficiency {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in OVERHEAD_TERMS:
            if not getattr(self, name) >= 0:
                raise ValueError(f"overhead {name!r} must be >= 0, got {getattr(self, name)!r}")


EFFICIENCY_TERMS = ("matmul", "attention", "memory", "kv_read", "collective")
OVERHEAD_TERMS = (
    "layer_overhead_s",
    "iteration_overhead_s",
    "sequence_overhead_s",
    "kv_gather_s",
)


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator (or a CPU) as the cost model sees it."""

    name: str
    peak_flops: float
    """Dense bf16 (or the run dtype's) peak FLOP/s of one device."""
    hbm_bandwidth: float
    """Device memory bandwidth, bytes/s."""
    hbm_bytes: float
    """Device memory capacity, bytes (for simulators that check KV capacity)."""
    nvlink_bandwidth: float
    """Intra-node link bandwidth per GPU per direction, bytes/s (TP all-reduce)."""
    network_bandwidth: float
    """Inter-node bandwidth per GPU per direction, bytes/s (PP sends, KVP merges across nodes)."""
    nvlink_latency_s: float
    """Fixed cost of one intra-node collective call (not fitted: see docs/cost-model.md)."""
    network_latency_s: float
    """Fixed cost of one inter-node collective or send."""
    gpus_per_node: int
    efficiency: Efficiency
    calibrated: bool = False
    """True once the efficiency coefficients were fitted to measurements on this machine."""
    notes: str = ""
    calibrated_for: str = ""
    """What the coefficients were fitted on: the model's shape, the dtype and the device type
    (medha.calibration.calibration_target); "" for datasheet profiles. An engine refuses a
    profile calibrated for another target: its times could be off by 10x or more."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("peak_flops", "hbm_bandwidth", "hbm_bytes", "nvlink_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.network_bandwidth > 0:
            raise ValueError(f"network_bandwidth must be > 0, got {self.network_bandwidth!r}")
        if self.nvlink_latency_s < 0 or self.network_latency_s < 0:
            raise ValueError("collective latencies must be >= 0")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")

    def with_efficiency(self, efficiency: Efficiency, *, calibrated: bool = True) -> DeviceProfile:
        return dataclasses.replace(self, efficiency=efficiency, calibrated=calibrated)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeviceProfile:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("efficiency"), dict):
            raise ValueError("a device profile is a JSON object with an 'efficiency' object")
        efficiency = Efficiency(**_checked_keys(Efficiency, data["efficiency"]))
        return cls(**{**_checked_keys(cls, data), "efficiency": efficiency})


def _checked_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if its keys are exactly `cls`'s fields (those with defaults may be left out)."""
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    unknown, missing = set(data) - {f.name for f in fields}, required - set(data)
    if unknown or missing:
        raise ValueError(
            f"{cls.__name__} JSON: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
        )
    return data


def _check_types(instance: Any) -> None:
    """Fields of the types they are declared with, numbers finite: a profile is read from
    JSON, where `true` would pass for the number 1 and `Infinity` for a time."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if field.type == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{field.name} must be finite, got {value!r}")
        elif field.type in ("int", "bool", "str"):
            expected = {"int": int, "bool": bool, "str": str}[field.type]
            if type(value) is not expected:
                article = "an" if field.type == "int" else "a"
                raise ValueError(f"{field.name} must be {article} {field.type}, got {value!r}")


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    """Write `profile` as JSON, atomically: a failed write (a full disk) leaves the file that
    was there, not a truncated one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(profile.to_json() + "\n", encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_profile(path: str | Path) -> DeviceProfile:
    return DeviceProfile.from_json(Path(path).read_text(encoding="utf-8"))


# Sources (see docs/cost-model.md for the full table):
# - peak FLOP/s, HBM bandwidth and capacity, NVLink: NVIDIA A100 / H100 / H200 datasheets
#   (dense bf16, i.e. without the 2:4 sparsity doubling; NVLink total bidirectional / 2).
# - network: one NIC per GPU as in DGX A100 (8x 200 Gb/s HDR = 25 GB/s per GPU) and
#   DGX H100 / H200 (8x 400 Gb/s NDR = 50 GB/s per GPU).
# - kv_read 0.92: the Medha paper's reported decode MBU (up to 92%).
# - attention: FlashAttention-2 paper reports 50-73% of A100 peak in the forward pass; the
#   FlashAttention-3 paper reports FA2-class kernels at ~35% of H100 peak (FA3: up to 75%).
#   Medha ran FA2-class kernels; use ~0.7 for FA3.
# - matmul, memory, collective, overheads: our assumptions for cuBLAS / NCCL at LLM shapes,
#   to be replaced by calibration on the target machine.
_GPU_COMMON: dict[str, Any] = {
    "memory": 0.85,
    "kv_read": 0.92,
    "collective": 0.75,
    "layer_overhead_s": 10 * US,
    "iteration_overhead_s": 1 * MS,
    "sequence_overhead_s": 0.0,
    "kv_gather_s": 0.0,
}

A100_80GB = DeviceProfile(
    name="a100-80gb",
    peak_flops=312 * TFLOPS,
    hbm_bandwidth=2039 * GB,
    hbm_bytes=80 * GB,
    nvlink_bandwidth=300 * GB,
    network_bandwidth=25 * GB,
    nvlink_latency_s=10 * US,
    network_latency_s=20 * US,
    gpus_per_node=8,
    efficiency=Efficiency(matmul=0.75, attention=0.60, **_GPU_COMMON),
    notes="A100 SXM4 80GB; DGX A100 node (NVLink3 600 GB/s total, 8x HDR 200 Gb/s)",
)

H100_80GB = DeviceProfile(
    name="h100-80gb",
    peak_flops=989 * TFLOPS,
    hbm_bandwidth=3350 * GB,
    hbm_bytes=80 * GB,
    nvlink_bandwidth=450 * GB,
    network_bandwidth=50 * GB,
    nvlink_latency_s=10 * US,
    network_latency_s=20 * US,
    gpus_per_node=8,
    efficiency=Efficiency(matmul=0.70, attention=0.35, **_GPU_COMMON),
    notes="H100 SXM5 80GB; DGX H100 node (NVLink4 900 GB/s total, 8x NDR 400 Gb/s)",
)

H200 = DeviceProfile(
    name="h200",
    peak_flops=989 * TFLOPS,
    hbm_bandwidth=4800 * GB,
    hbm_bytes=141 * GB,
    nvlink_bandwidth=450 * GB,
    network_bandwidth=50 * GB,
    nvlink_latency_s=10 * US,
    network_latency_s=20 * US,
    gpus_per_node=8,
    efficiency=Efficiency(matmul=0.70, attention=0.35, **_GPU_COMMON),
    notes="H200 SXM 141GB; same compute die and NVLink4 as H100, HBM3e",
)

# The CPU's rates are nominal units (roughly a 2-core AVX2 laptop), not claims: every coefficient
# starts at 1.0 / zero overhead and means nothing until `fit_profile` has fitted it on the machine
# at hand (calibrated=False says so). Links model gloo over loopback / shared memory.
CPU = DeviceProfile(
    name="cpu",
    peak_flops=100 * 1e9,
    hbm_bandwidth=20 * GB,
    hbm_bytes=16 * GB,
    nvlink_bandwidth=5 * GB,
    network_bandwidth=1 * GB,
    nvlink_latency_s=50 * US,
    network_latency_s=100 * US,
    gpus_per_node=1,
    efficiency=Efficiency(matmul=1.0, attention=1.0, memory=1.0, kv_read=1.0, collective=1.0),
    calibrated=False,
    notes="nominal CPU units; fit with medha.perf.calibration.fit_profile before trusting",
)

DEVICE_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (A100_80GB, H100_80GB, H200, CPU)}


def device_profile(name: str) -> DeviceProfile:
    """A built-in profile by name ('a100-80gb', 'h100-80gb', 'h200', 'cpu')."""
    try:
        return DEVICE_PROFILES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown device profile {name!r} (known: {', '.join(DEVICE_PROFILES)})"
        ) from None


__all__ = [
    "A100_80GB",
    "CPU",
    "DEVICE_PROFILES",
    "EFFICIENCY_TERMS",
    "H100_80GB",
    "H200",
    "OVERHEAD_TERMS",
    "DeviceProfile",
    "Efficiency",
    "device_profile",
    "load_profile",
    "save_profile",
]
