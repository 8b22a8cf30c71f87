"""Cost model: how long a batch, a pipeline stage, or a whole prefill takes on a replica.

An analytic roofline over per-op FLOPs and bytes, with efficiency coefficients per device that
calibration fits to measured step times. The scheduler's adaptive chunking, LARS and the simulator
all read their numbers from here (see docs/cost-model.md).
"""

from __future__ import annotations

from medha.perf.calibration import CalibrationResult, Measurement, fit_profile
from medha.perf.cost_model import RooflineCostModel
from medha.perf.hardware import (
    A100_80GB,
    CPU,
    DEVICE_PROFILES,
    H100_80GB,
    H200,
    DeviceProfile,
    Efficiency,
    device_profile,
    load_profile,
    save_profile,
)
from medha.perf.models import LLAMA_3_8B, LLAMA_3_70B, MODEL_PRESETS, SMOLLM2_135M, model_preset
from medha.perf.prefill_table import ChunkBudget, PrefillTable
from medha.perf.replica import ReplicaSpec
from medha.perf.roofline import Terms
from medha.perf.time_scale import OnlineTimeScale

__all__ = [
    "A100_80GB",
    "CPU",
    "DEVICE_PROFILES",
    "H100_80GB",
    "H200",
    "LLAMA_3_8B",
    "LLAMA_3_70B",
    "MODEL_PRESETS",
    "SMOLLM2_135M",
    "CalibrationResult",
    "ChunkBudget",
    "DeviceProfile",
    "Efficiency",
    "Measurement",
    "OnlineTimeScale",
    "PrefillTable",
    "ReplicaSpec",
    "RooflineCostModel",
    "Terms",
    "device_profile",
    "fit_profile",
    "load_profile",
    "model_preset",
    "save_profile",
]
