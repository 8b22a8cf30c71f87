"""Adaptive chunk sizing: the largest prefill chunk whose batch still fits the time budget.

Candidates are multiples of `chunk_multiple` from `min_chunk` to `max_chunk`, plus the exact
number of tokens left when that finishes the prompt (or reaches a KVP boundary). The batch time
grows with the chunk, piecewise nearly linearly, so interpolating between the ends of the bracket
usually lands within +-tolerance of the budget in one or two steps; bisection takes over when
interpolation does not pay, so the worst case is one call more than a binary search:
O(log(max_chunk / chunk_multiple)) cost-model calls.
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
    finishes: bool = False,
) -> ChunkChoice | None:
    """The largest chunk c (c <= tokens_left) with predict(c) <= budget x (1 + tolerance).

    `predict(c)` is the batch time with a c-token chunk added; it must not decrease with c.
    With `finishes` (the `tokens_left` complete the prompt), that whole rest is accepted up to
    budget x (1 + finish_tolerance). Returns None when even the smallest candidate is over budget.
    """
    if tokens_left < 1:
        raise ValueError(f"no tokens left to chunk ({tokens_left})")
    ceiling = budget * (1.0 + config.chunk_tolerance)
    good_enough = budget * (1.0 - config.chunk_tolerance)

    top = min(tokens_left, config.max_chunk)
    top_time = predict(top)
    if top_time <= ceiling or (
        finishes and top == tokens_left and top_time <= finish_ceiling(budget, config)
    ):
        return ChunkChoice(top, top_time)
    smallest, step = config.min_chunk, config.chunk_multiple
    if top <= smallest:
        return None

    # Grid point k is the chunk smallest + k * step. Invariant: grid point `low` fits, grid
    # point `high` does not (or lies at/after `top`, which is known not to fit).
    high, high_chunk, high_time = -(-(top - smallest) // step), top, top_time
    calls_left = 1 + _bisections(high)
    """Calls still allowed: at most one more than a plain binary search would make."""
    # Batch time grows with the chunk about linearly (flat while the weight read dominates,
    # plus a small quadratic attention term), so first guess where the line through the
    # origin and `top` meets the budget; later guesses interpolate between the bracket's ends.
    guess = min(max(int((top * budget / top_time - smallest) // step), 0), high - 1)
    guess_time = predict(smallest + guess * step)
    if guess_time <= ceiling:
        low, low_time = guess, guess_time
    else:
        if guess == 0:
            return None
        high, high_chunk, high_time = guess, smallest + guess * step, guess_time
        low, low_time = 0, predict(smallest)
        calls_left -= 1
        if low_time > ceiling:
            return None
    while high - low > 1 and low_time < good_enough:
        low_chunk = smallest + low * step
        if calls_left > _bisections(high - low - 1):
            aim = low_chunk + (high_chunk - low_chunk) * (budget - low_time) / (
                high_time - low_time
            )
            middle = min(max(int((aim - smallest) // step), low + 1), high - 1)
        else:
            middle = (low + high) // 2
        calls_left -= 1
        middle_time = predict(smallest + middle * step)
        if middle_time <= ceiling:
            low, low_time = middle, middle_time
        else:
            high, high_chunk, high_time = middle, smallest + middle * step, middle_time
    return ChunkChoice(smallest + low * step, low_time)


def finish_ceiling(budget: float, config: SchedulerConfig) -> float:
    """The most a batch may take when its last chunk completes a prompt."""
    return budget * (1.0 + max(config.finish_tolerance, config.chunk_tolerance))


def _bisections(width: int) -> int:
    """Bisection steps that shrink a bracket of `width` grid steps to one: ceil(log2(width))."""
    return max(width - 1, 0).bit_length()
