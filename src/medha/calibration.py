"""Calibrate the cost model to this machine: time the real executor on a grid of batch shapes
and fit the roofline model's efficiency coefficients (medha.perf.fit_profile) to the times.

The engine runs a short calibration at start unless given a saved profile; `medha calibrate`
runs a longer one and saves it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from medha.errors import InvalidConfigError
from medha.model.arch import ModelArch
from medha.model.runner import ModelRunner, StepSeq
from medha.perf import CPU, CalibrationResult, DeviceProfile, Measurement, fit_profile
from medha.scheduler import BatchCostModel, SeqShape


def calibration_grid(num_blocks: int, block_size: int) -> list[tuple[SeqShape, ...]]:
    """Batch shapes that separate the model's terms: prefill chunks (matmul-bound) at several
    prefix lengths (attention), decode batches (weight and KV reads), and mixes of both; those
    whose sequences fit a cache of `num_blocks` blocks of `block_size` tokens."""
    grid: list[tuple[SeqShape, ...]] = []
    for chunk in (16, 64, 256, 1024):
        for prefix in (0, 512, 2048, 6144):
            grid.append((SeqShape(chunk, prefix),))
    for batch in (1, 4, 16):
        for context in (64, 1024):
            grid.append(tuple(SeqShape(1, context) for _ in range(batch)))
    grid.append((*(SeqShape(1, 256) for _ in range(4)), SeqShape(256, 0)))
    grid.append((*(SeqShape(1, 2048) for _ in range(4)), SeqShape(128, 4096)))
    return [shapes for shapes in grid if blocks_needed(shapes, block_size) <= num_blocks]


def blocks_needed(shapes: Sequence[SeqShape], block_size: int) -> int:
    """KV blocks a step of `shapes` takes (time_batch): whole blocks per sequence."""
    return sum(-(-(shape.kv_tokens + shape.q_tokens) // block_size) for shape in shapes)


MIN_GRID_TOKENS = 16
"""The smallest batch of the grid: one 16-token chunk."""

MIN_CALIBRATION_TOKENS = 2048
"""KV capacity a calibration needs: below it the grid has too few shapes to separate the
model's terms (a fit on three shapes reports 0% error and predicts nothing)."""


def calibration_target(arch: ModelArch, dtype: torch.dtype, device: torch.device) -> str:
    """What a profile's coefficients hold for (DeviceProfile.calibrated_for): the shapes of
    the model's products, the dtype and the kind of device. Weights and names do not count: a
    fine-tune of the same architecture times the same."""
    shape = (
        f"{arch.num_layers}x{arch.hidden_size} heads {arch.num_heads}/{arch.num_kv_heads}x"
        f"{arch.head_dim} ffn {arch.intermediate_size} vocab {arch.vocab_size}"
    )
    return f"{shape}; {str(dtype).removeprefix('torch.')}; {device.type}"


def mixed_validation_batches(
    num_blocks: int, block_size: int, count: int = 12, seed: int = 0
) -> list[tuple[SeqShape, ...]]:
    """Random mixed batches unlike the grid (decodes at various contexts plus a prefill chunk
    over a prefix): what the engine runs, to check the fitted model's predictions. Fewer than
    `count` where few of them fit the cache (none below ~200 tokens)."""
    import random

    rng = random.Random(seed)
    batches: list[tuple[SeqShape, ...]] = []
    for _ in range(1000 * count):
        if len(batches) == count:
            break
        decodes = [SeqShape(1, rng.randint(16, 3000)) for _ in range(rng.randint(0, 8))]
        chunk = SeqShape(rng.choice((32, 96, 160, 384, 768)), rng.randint(0, 4000))
        batch = (*decodes, chunk)
        if blocks_needed(batch, block_size) <= num_blocks:
            batches.append(batch)
    return batches


def prediction_errors(
    runner: ModelRunner, cost: BatchCostModel, batches: Sequence[tuple[SeqShape, ...]]
) -> list[tuple[float, float]]:
    """(predicted, measured) seconds of each batch."""
    return [(cost.batch_time(batch), time_batch(runner, batch)) for batch in batches]


def time_batch(runner: ModelRunner, shapes: Sequence[SeqShape], repeats: int = 2) -> float:
    """Best-of-`repeats` seconds of one step of `shapes` on `runner` (random tokens, the cache
    filled with whatever was there: only the time matters)."""
    block = runner.block_size
    seqs, next_block = [], 0
    for shape in shapes:
        total = shape.kv_tokens + shape.q_tokens
        blocks = list(range(next_block, next_block + -(-total // block)))
        next_block += len(blocks)
        ids = torch.randint(0, runner.arch.vocab_size, (shape.q_tokens,)).tolist()
        seqs.append(StepSeq(ids, shape.kv_tokens, blocks))
    if next_block > runner.kv_cache.num_blocks:
        raise ValueError(
            f"batch needs {next_block} blocks; the cache has {runner.kv_cache.num_blocks}"
        )
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        runner.step(seqs)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_runner(
    runner: ModelRunner,
    *,
    base: DeviceProfile = CPU,
    budget_s: float = 3.0,
    dtype_bytes: int = 4,
) -> tuple[CalibrationResult, list[Measurement]]:
    """Measure as much of the grid as fits in `budget_s` (small shapes first) and fit."""
    cache = runner.kv_cache
    grid = calibration_grid(cache.num_blocks, runner.block_size)
    if not grid:
        raise InvalidConfigError(
            f"a KV cache of {cache.capacity_tokens} tokens is too small to calibrate the cost "
            f"model on (its smallest batch needs {MIN_GRID_TOKENS}): give more blocks, or a "
            "saved cost_profile (`medha calibrate`)"
        )
    grid.sort(key=lambda s: sum(x.q_tokens for x in s))
    time_batch(runner, grid[0], repeats=1)  # warm-up: first calls allocate
    measurements: list[Measurement] = []
    deadline = time.perf_counter() + budget_s
    for shapes in grid:
        if measurements and time.perf_counter() > deadline:
            break
        measurements.append(Measurement(shapes, time_batch(runner, shapes)))
    result = fit_profile(measurements, base, runner.arch, dtype_bytes=dtype_bytes)
    # The weights' dtype, as EngineConfig.dtype sets it (a KV cache could one day differ).
    weights_dtype = next(runner.model.parameters()).dtype
    target = calibration_target(runner.arch, weights_dtype, runner.device)
    profile = dataclasses.replace(result.profile, calibrated_for=target)
    return dataclasses.replace(result, profile=profile), measurements
