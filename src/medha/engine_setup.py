"""Build what an Engine runs from its config: model runner, tokenizer, calibrated cost model,
and the Scheduler. Runs on the engine's model thread at start (loading takes seconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medha.calibration import calibrate_runner, calibration_target
from medha.config import EngineConfig
from medha.errors import InvalidConfigError
from medha.log import get_logger
from medha.model.arch import ModelArch
from medha.model.device import check_device
from medha.model.generation_defaults import configured_defaults
from medha.model.kv_cache import KVCache
from medha.model.loader import load_checkpoint
from medha.model.runner import ModelRunner, load_model
from medha.model.setup import new_kv_cache, open_runner, resolve_dtype
from medha.model.tokenizer import Tokenizer
from medha.perf import (
    CalibrationResult,
    ChunkBudget,
    DeviceProfile,
    ReplicaSpec,
    RooflineCostModel,
    load_profile,
)
from medha.perf.prefill_refresh import PrefillTableRefresher
from medha.perf.time_scale import OnlineTimeScale
from medha.scheduler import Scheduler, SchedulerConfig

_log = get_logger(__name__)


@dataclass
class EngineParts:
    runner: ModelRunner
    tokenizer: Tokenizer
    scheduler: Scheduler
    cost: RooflineCostModel
    max_model_len: int
    calibration: CalibrationResult | None
    sampling_defaults: dict[str, float | int]
    """SamplingParams fields of EngineConfig.generation_config."""


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Every part, or the first thing about `config` that cannot work with this model on this
    machine, as an InvalidConfigError (the cheap checks come before loading the weights)."""
    device = check_device(config.device)
    if device.type == "cuda":
        # The current device is per thread and device-less launches (Triton's) use it: this
        # runs on the thread every step will run on (medha.actors.model_thread).
        torch.cuda.set_device(device)
    checkpoint = load_checkpoint(config.model)
    arch = checkpoint.arch
    max_model_len = max_model_len_for(config, arch)
    defaults = configured_defaults(config.generation_config, checkpoint.path)
    saved = saved_profile(config, arch)
    dtype = resolve_dtype(config.dtype)
    model = load_model(arch, checkpoint.get_tensor, dtype, device)
    num_blocks = kv_blocks_for(config, arch, dtype, arch.num_layers)
    cache = new_kv_cache(arch, num_blocks, config.block_size, dtype, device)
    runner = open_runner(model, cache, config.attention_backend)
    profile, calibration = device_profile(config, saved, lambda: runner)
    scheduler, cost = build_scheduler(config, num_blocks, arch, profile, ReplicaSpec(), dtype)
    return EngineParts(
        runner, checkpoint.tokenizer, scheduler, cost, max_model_len, calibration, defaults
    )


# -- shared with the multi-process engine (medha.parallel.engine_parts) -------------------------


def max_model_len_for(config: EngineConfig, arch: ModelArch) -> int:
    """config.max_model_len (None: max_position_embeddings, capped by a sliding window);
    InvalidConfigError beyond the model's context, where its positions were never trained or
    its attention would need the window's mask (vLLM refuses it too)."""
    if config.max_model_len is None:
        # Not a linear RoPE's scaled length (as before), but a sliding window's cap.
        return min(arch.max_position_embeddings, arch.context_len)
    context = arch.context_len
    if config.max_model_len > context:
        why = [f"max_position_embeddings={arch.max_position_embeddings}"]
        if arch.rope_type == "linear":
            why.append("scaled by its linear RoPE")
        if arch.sliding_window is not None and context == arch.sliding_window:
            why.append(f"capped by its sliding window of {arch.sliding_window}")
        raise InvalidConfigError(
            f"max_model_len={config.max_model_len} exceeds the model's context of {context} "
            f"tokens ({', '.join(why)}); set max_model_len <= {context} or leave it unset"
        )
    return config.max_model_len


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_blocks_for(config: EngineConfig, arch: ModelArch, dtype: torch.dtype, layers: int) -> int:
    """`num_blocks` if given, else as many blocks of `layers` layers as kv_cache_gib holds."""
    if config.num_blocks:
        return config.num_blocks
    per_block = KVCache.bytes_per_block(arch, config.block_size, dtype, layers)
    blocks = int(config.kv_cache_gib * 2**30) // per_block
    if blocks < 1:
        raise InvalidConfigError(
            f"kv_cache_gib={config.kv_cache_gib} holds no KV block (one of {config.block_size} "
            f"tokens takes {per_block} bytes); raise kv_cache_gib"
        )
    return blocks


def saved_profile(config: EngineConfig, arch: ModelArch) -> DeviceProfile | None:
    """The profile `cost_profile` names (None: calibrate); read before the weights load, so
    that a wrong path, or a profile calibrated for another model, dtype or kind of device,
    fails in a moment, as an InvalidConfigError."""
    if config.cost_profile is None:
        return None
    try:
        profile = load_profile(config.cost_profile)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise InvalidConfigError(
            f"cost_profile {str(config.cost_profile)!r} is not a readable device profile "
            f"(write one with `medha calibrate` or medha.perf.save_profile): {exc}"
        ) from exc
    target = calibration_target(arch, resolve_dtype(config.dtype), torch.device(config.device))
    if profile.calibrated_for and profile.calibrated_for != target:
        raise InvalidConfigError(
            f"cost_profile {str(config.cost_profile)!r} was calibrated for "
            f"{profile.calibrated_for!r}, and this engine runs {target!r} (model shape; dtype; "
            "device): its times would be off. Calibrate for this one (`medha calibrate`), or "
            "leave cost_profile unset for a calibration at start"
        )
    return profile


def device_profile(
    config: EngineConfig, saved: DeviceProfile | None, runner: Callable[[], ModelRunner]
) -> tuple[DeviceProfile, CalibrationResult | None]:
    """`saved` (see saved_profile), else one calibrated now on `runner()`."""
    if saved is not None:
        return saved, None
    calibration, _ = calibrate_runner(
        runner(),
        budget_s=config.calibration_seconds,
        dtype_bytes=dtype_bytes(resolve_dtype(config.dtype)),
    )
    _log.info("calibrated cost model", median_error=round(calibration.median_abs_rel_error, 3))
    return calibration.profile, calibration


def build_scheduler(
    config: EngineConfig,
    num_blocks: int,
    arch: ModelArch,
    profile: DeviceProfile,
    replica: ReplicaSpec,
    dtype: torch.dtype,
    **parallel: Any,
) -> tuple[Scheduler, RooflineCostModel]:
    """The Scheduler of `config` and the cost model it plans with; `parallel` adds the
    KVP/SPP fields of SchedulerConfig."""
    scheduler_config = build_scheduler_config(config, num_blocks, **parallel)
    cost = RooflineCostModel(
        arch,
        profile,
        replica,
        dtype_bytes=dtype_bytes(dtype),
        prefill_chunking=ChunkBudget.of(scheduler_config),
    )
    # Build the prefill table out to the longest prompt now (this runs off the event loop),
    # not in the first long request's add_request, which would stall every decode.
    cost.prefill_time(max_model_len_for(config, arch))
    return Scheduler(scheduler_config, cost), cost


def build_scheduler_config(
    config: EngineConfig, num_blocks: int, **parallel: Any
) -> SchedulerConfig:
    """The SchedulerConfig of `config`; `parallel` adds its KVP/SPP fields."""
    return SchedulerConfig(
        policy=config.policy,
        target_batch_time=config.target_batch_time,
        lone_batch_time=config.lone_batch_time,
        finish_tolerance=config.finish_tolerance,
        deadline_factor=config.deadline_factor,
        min_deadline=config.min_deadline,
        lead_guard=config.lead_guard,
        max_chunk=config.max_chunk,
        fixed_chunk=config.fixed_chunk,
        max_batch_size=config.max_num_seqs,
        block_size=config.block_size,
        num_blocks=num_blocks,
        **parallel,
    )


def online_time_scale(
    config: EngineConfig, cost: RooflineCostModel, max_model_len: int
) -> OnlineTimeScale | None:
    """The online learner of the cost model's level, if the config wants one. The prefill
    tables its steps make due are walked 2% of an iteration's budget at a time."""
    if not config.online_time_scale:
        return None
    slice_seconds = 0.02 * config.target_batch_time
    return OnlineTimeScale(cost, tables=PrefillTableRefresher(cost, max_model_len, slice_seconds))
