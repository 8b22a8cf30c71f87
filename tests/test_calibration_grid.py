"""The calibration grid holds only batches the KV cache has blocks for: sequences take whole
blocks, so a cache with room for a batch's tokens may still lack the blocks (258 blocks of 16
for 4 x 1025 tokens) and an engine starting without a profile crashed there."""

from __future__ import annotations

import pytest

from medha.calibration import (
    blocks_needed,
    calibrate_runner,
    calibration_grid,
    mixed_validation_batches,
)
from medha.errors import InvalidConfigError
from medha.model.setup import build_runner
from medha.scheduler import SeqShape


def test_a_sequence_takes_whole_blocks() -> None:
    assert blocks_needed([SeqShape(1, 1024)] * 4, 16) == 4 * 65
    assert blocks_needed([SeqShape(16, 0), SeqShape(1, 15)], 16) == 2


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_every_batch_of_the_grid_and_of_the_validation_has_its_blocks(block_size: int) -> None:
    for num_blocks in range(1, 1200):
        grid = calibration_grid(num_blocks, block_size)
        assert all(blocks_needed(batch, block_size) <= num_blocks for batch in grid)
        checks = mixed_validation_batches(num_blocks, block_size, count=3)
        assert all(blocks_needed(batch, block_size) <= num_blocks for batch in checks)
    # The largest cache leaves nothing out: 16 + 6 + 1 + 1 batches.
    assert len(calibration_grid(100_000, block_size)) == 24


@pytest.mark.parametrize("num_blocks", [258, 1034])
def test_a_cache_just_short_of_a_grid_batch_calibrates(num_blocks: int) -> None:
    runner, _ = build_runner("tiny-random", num_blocks=num_blocks)
    result, measurements = calibrate_runner(runner, budget_s=0.2)
    assert measurements and result.profile.calibrated_for


def test_a_cache_too_small_for_any_batch_is_a_config_error() -> None:
    runner, _ = build_runner("tiny-random", num_blocks=1, block_size=8)
    with pytest.raises(InvalidConfigError, match="too small to calibrate"):
        calibrate_runner(runner, budget_s=0.2)
