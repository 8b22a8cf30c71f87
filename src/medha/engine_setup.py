"""Build what an Engine runs from its config: model runner, tokenizer, calibrated cost model,
and the Scheduler. Runs in a worker thread at start (loading takes seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medha.calibration import calibrate_runner
from medha.config import EngineConfig
from medha.log import get_logger
from medha.model.kv_cache import KVCache
from medha.model.loader import load_checkpoint
from medha.model.runner import ModelRunner, load_model
from medha.model.setup import resolve_dtype
from medha.model.tokenizer import Tokenizer
from medha.perf import CalibrationResult, RooflineCostModel, load_profile
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


def build_engine_parts(config: EngineConfig) -> EngineParts:
    checkpoint = load_checkpoint(config.model)
    arch = checkpoint.arch
    dtype = resolve_dtype(config.dtype)
    model = load_model(arch, checkpoint.get_tensor, dtype, config.device)
    element = torch.empty((), dtype=dtype).element_size()
    num_blocks = config.num_blocks or max(
        1,
        int(config.kv_cache_gib * 2**30)
        // KVCache.bytes_per_block(arch, config.block_size, dtype, arch.num_layers),
    )
    cache = KVCache(arch, num_blocks, config.block_size, dtype, config.device)
    runner = ModelRunner(model, cache, config.attention_backend)

    calibration = None
    if config.cost_profile is not None:
        profile = load_profile(config.cost_profile)
    else:
        calibration, _ = calibrate_runner(
            runner, budget_s=config.calibration_seconds, dtype_bytes=element
        )
        profile = calibration.profile
        _log.info("calibrated cost model", median_error=round(calibration.median_abs_rel_error, 3))
    cost = RooflineCostModel(arch, profile, dtype_bytes=element)
    scheduler = Scheduler(
        SchedulerConfig(
            policy=config.policy,
            target_batch_time=config.target_batch_time,
            max_chunk=config.max_chunk,
            fixed_chunk=config.fixed_chunk,
            max_batch_size=config.max_num_seqs,
            block_size=config.block_size,
            num_blocks=num_blocks,
        ),
        cost,
    )
    max_model_len = config.max_model_len or arch.max_position_embeddings
    return EngineParts(runner, checkpoint.tokenizer, scheduler, cost, max_model_len, calibration)
