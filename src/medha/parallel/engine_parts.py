"""Build what a multi-process Engine runs: tokenizer, cost model of the TP x PP x KVP replica, the
Scheduler with KVP groups and SPP, and the started worker processes.

The engine's own process does not serve the model: it validates the checkpoint (config and tensor
headers only, so a bad path fails here, in milliseconds, before any process is spawned), checks
that the layout fits the model, and launches the workers. Only without `cost_profile` does it
load the whole model once, on one device, to calibrate the cost model, and release it after:
pass a profile saved by `medha calibrate` for a model that does not fit one device. Runs in a
worker thread at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medha.config import EngineConfig
from medha.errors import InvalidConfigError
from medha.kernels.attention import select_backend
from medha.log import get_logger
from medha.model.arch import ModelArch
from medha.model.loader import load_checkpoint
from medha.parallel.cluster import Cluster
from medha.parallel.layout import RankLayout, split_layers
from medha.parallel.tp import check_tp
from medha.scheduler import Scheduler

_log = get_logger(__name__)


@dataclass
class ParallelParts:
    tokenizer: Any
    scheduler: Scheduler
    cost: Any
    max_model_len: int
    vocab_size: int
    calibration: Any
    cluster: Cluster
    sampling_defaults: dict[str, float | int]
    """SamplingParams fields of EngineConfig.generation_config."""


def build_parallel_parts(config: EngineConfig) -> ParallelParts:
    import torch

    from medha.engine_setup import (
        build_scheduler,
        device_profile,
        kv_blocks_for,
        max_model_len_for,
        saved_profile,
    )
    from medha.model.device import check_device
    from medha.model.generation_defaults import configured_defaults
    from medha.model.setup import build_runner, resolve_dtype
    from medha.parallel.tp import local_arch
    from medha.perf import ReplicaSpec

    parallel = config.parallel
    layout = RankLayout(tp=parallel.tp, pp=parallel.pp, kvp=parallel.kvp)
    if parallel.attach is None:  # spawned workers use this machine's devices
        check_device(config.device)
    checkpoint = load_checkpoint(config.model)
    arch = checkpoint.arch
    _check_layout(config, arch, layout)
    defaults = configured_defaults(config.generation_config, checkpoint.path)
    max_model_len = _kvp_max_model_len(config, max_model_len_for(config, arch), layout)
    saved = saved_profile(config, arch)
    dtype = resolve_dtype(config.dtype)
    # One worker's pool: its TP shard of the heads, for the layers of the largest stage.
    stage_layers = max(len(r) for r in split_layers(arch.num_layers, layout.pp))
    num_blocks = kv_blocks_for(config, local_arch(arch, layout.tp), dtype, stage_layers)

    # Without a saved profile, the device's coefficients are calibrated on one device in this
    # process (the parallel costs then come from the roofline's collective terms). Pass
    # `cost_profile` to skip this (recommended for large models).
    profile, calibration = device_profile(
        config,
        saved,
        lambda: build_runner(
            config.model,
            num_blocks=512,
            dtype=config.dtype,
            device=config.device,
            attention_backend=config.attention_backend,
        )[0],
    )
    if torch.device(config.device).type == "cuda":
        torch.cuda.empty_cache()  # the calibration model is gone; give its memory back
    replica = ReplicaSpec(
        tp=layout.tp,
        pp=layout.pp,
        kvp=layout.kvp,
        kvp_max_tokens_per_group=parallel.max_tokens_per_kvp_group,
    )
    scheduler, cost = build_scheduler(
        config,
        num_blocks,
        arch,
        profile,
        replica,
        dtype,
        kvp_groups=layout.kvp,
        max_tokens_per_kvp_group=parallel.max_tokens_per_kvp_group,
        pp_stages=layout.pp,
        spp=parallel.spp,
    )
    cluster = Cluster(
        dict(
            model=str(checkpoint.path),
            dtype=config.dtype,
            device=config.device,
            attention_backend=config.attention_backend,
            num_blocks=num_blocks,
            block_size=config.block_size,
        ),
        layout,
        attach=parallel.attach,
    )
    cluster.start(parallel.timeout_s)
    return ParallelParts(
        checkpoint.tokenizer,
        scheduler,
        cost,
        max_model_len,
        arch.vocab_size,
        calibration,
        cluster,
        defaults,
    )


def _check_layout(config: EngineConfig, arch: ModelArch, layout: RankLayout) -> None:
    """What would only fail once the workers are up, as InvalidConfigError before they are."""
    try:
        check_tp(arch, layout.tp)
    except ValueError as exc:
        raise InvalidConfigError(str(exc)) from exc
    if arch.num_layers < layout.pp:
        raise InvalidConfigError(f"pp={layout.pp} exceeds the model's {arch.num_layers} layers")
    if config.parallel.attach is None:  # spawned workers use this machine's devices
        try:
            select_backend(config.device, config.attention_backend)
        except ValueError as exc:
            raise InvalidConfigError(str(exc)) from exc


def _kvp_max_model_len(config: EngineConfig, max_model_len: int, layout: RankLayout) -> int:
    """With max_tokens_per_kvp_group M, a request holds at most kvp x M tokens."""
    per_group = config.parallel.max_tokens_per_kvp_group
    if per_group is None:
        return max_model_len
    capacity = layout.kvp * per_group
    if config.max_model_len is not None and config.max_model_len > capacity:
        raise InvalidConfigError(
            f"max_model_len={config.max_model_len} exceeds what kvp={layout.kvp} groups of "
            f"max_tokens_per_kvp_group={per_group} hold ({capacity} tokens)"
        )
    return min(max_model_len, capacity)
