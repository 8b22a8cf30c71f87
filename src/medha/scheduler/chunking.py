"""Adaptive chunk sizing: the largest prefill chunk whose batch still fits the time budget.

Candidates are multiples of `chunk_multiple` from `min_chunk` to `max_chunk`, plus the exact
number of tokens left when that finishes the prompt (or reaches a KVP boundary). The batch time
grows with the chunk, so a binary search needs O(log(max_chunk / chunk_multiple)) cost-model
calls; it stops early once a chunk lands within +-tolerance of the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medha.scheduler.config import SchedulerConfig


@dataclass(frozen=True, slots=True)
class ChunkChoice:
    tokens: int
    predicted_time: float
    """Predicted batch time with this chunk added."""


def largest_fitting_chunk(
    predict: Callable[[int], float],
    tokens_left: int,
    budget: float,
    config: SchedulerConfig,
) -> ChunkChoice | None:
    """The largest chunk c (c <= tokens_left) with predict(c) <= budget x (1 + tolerance).

    `predict(c)` is the batch time with a c-token chunk added; it must not decrease with c.
    Returns None when even the smallest candidate is over budget.
    """
    if tokens_left < 1:
        raise ValueError(f"no tokens left to chunk ({tokens_left})")
    ceiling = budget * (1.0 + config.chunk_tolerance)
    good_enough = budget * (1.0 - config.chunk_tolerance)

    top = min(tokens_left, config.max_chunk)
    top_time = predict(top)
    if top_time <= ceiling:
        return ChunkChoice(top, top_time)
    smallest = config.min_chunk
    if top <= smallest:
        return None
    smallest_time = predict(smallest)
    if smallest_time > ceiling:
        return None

    step = config.chunk_multiple
    # Invariant: grid point `low` fits, grid point `high` does not (or lies at/after `top`,
    # which is known not to fit). Grid point k is the chunk smallest + k * step.
    low, low_time = 0, smallest_time
    high = -(-(top - smallest) // step)
    while high - low > 1 and low_time < good_enough:
        middle = (low + high) // 2
        middle_time = predict(smallest + middle * step)
        if middle_time <= ceiling:
            low, low_time = middle, middle_time
        else:
            high = middle
    return ChunkChoice(smallest + low * step, low_time)
