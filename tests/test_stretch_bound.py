"""least_worst_slowdown: the floor under any one-at-a-time schedule (benchmarks/mixed_cpu.py)."""

from __future__ import annotations

import itertools
import random

import pytest

from medha.bench.stretch_bound import least_worst_slowdown, pooled_percentile_floor
from medha.sim.metrics import percentile


def test_requests_that_never_overlap_need_no_slowdown() -> None:
    assert least_worst_slowdown([], []) == 1.0
    assert least_worst_slowdown([5.0], [0.3]) == 1.0
    assert least_worst_slowdown([0.0, 0.3, 1.0], [0.3, 0.5, 0.1]) == 1.0


def test_two_equal_chats_51_ms_apart() -> None:
    # Whichever goes second finishes at 0.6 s; the later arrival going second is best.
    bound = least_worst_slowdown([0.0, 0.051], [0.3, 0.3])
    assert bound == pytest.approx((0.6 - 0.051) / 0.3, rel=1e-5)


def test_a_short_request_preempts_a_long_one() -> None:
    # The short one preempts: it finishes at 2 s (slowdown 1), the long one at 11 s (1.1).
    # One at a time without preemption the best is 1.2 (idle until the short one arrives).
    assert least_worst_slowdown([0.0, 1.0], [10.0, 1.0]) == pytest.approx(1.1, rel=1e-5)


def test_balances_the_slowdowns_of_a_burst() -> None:
    # Three equal requests at once: the last of any order finishes at 3 w.
    assert least_worst_slowdown([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == pytest.approx(3.0, rel=1e-5)


def test_equals_the_best_order_when_everything_arrives_together() -> None:
    # With one release time preemption gains nothing, so the brute force over orders is exact.
    rng = random.Random(7)
    for _ in range(30):
        works = [rng.uniform(0.05, 2.0) for _ in range(rng.randint(2, 5))]
        best = min(
            max(sum(works[k] for k in order[: i + 1]) / works[order[i]] for i in range(len(order)))
            for order in itertools.permutations(range(len(works)))
        )
        assert least_worst_slowdown([1.0] * len(works), works) == pytest.approx(best, rel=1e-5)


def _fixed_priority_worst(arrivals: list[float], works: list[float], order: list[int]) -> float:
    """Worst slowdown when the server always runs the waiting job that comes first in `order`
    (preemptive), simulated in time steps between arrivals and completions."""
    rank = {job: position for position, job in enumerate(order)}
    left = dict(enumerate(works))
    now, worst = min(arrivals), 1.0
    while left:
        ready = [j for j in left if arrivals[j] <= now]
        if not ready:
            now = min(arrivals[j] for j in left)
            continue
        job = min(ready, key=rank.__getitem__)
        later = [arrivals[j] for j in left if arrivals[j] > now]
        ran = min([left[job], *(a - now for a in later)])
        now += ran
        left[job] -= ran
        if left[job] <= 1e-12:
            del left[job]
            worst = max(worst, (now - arrivals[job]) / works[job])
    return worst


def test_equals_the_best_fixed_priority_schedule_for_staggered_arrivals() -> None:
    # EDF with the deadlines a_j + S w_j is a fixed priority order, so the optimum is the best
    # worst slowdown over all priority orders: a brute force independent of the bisection.
    rng = random.Random(3)
    for _ in range(60):
        count = rng.randint(2, 5)
        arrivals = [rng.uniform(0, 1.5) for _ in range(count)]
        works = [rng.uniform(0.05, 1.0) for _ in range(count)]
        best = min(
            _fixed_priority_worst(arrivals, works, list(order))
            for order in itertools.permutations(range(count))
        )
        bound = least_worst_slowdown(arrivals, works, tolerance=1e-9)
        assert bound == pytest.approx(best, rel=1e-6)
        assert bound <= best * (1 + 1e-9)  # from below


def test_only_the_gaps_between_arrivals_matter() -> None:
    reference = least_worst_slowdown([0.0, 0.051], [0.3, 0.3])
    for shift in (-5.0, 1e6):
        shifted = least_worst_slowdown([shift, shift + 0.051], [0.3, 0.3])
        assert shifted == pytest.approx(reference, rel=1e-6)
    assert least_worst_slowdown([-5.0], [1.0]) == 1.0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        least_worst_slowdown([0.0], [1.0], tolerance=0.0)
    with pytest.raises(ValueError, match="arrivals but"):
        least_worst_slowdown([0.0], [])
    with pytest.raises(ValueError, match="positive"):
        least_worst_slowdown([0.0], [0.0])
    with pytest.raises(ValueError, match="finite"):
        least_worst_slowdown([float("nan")], [1.0])


def test_pooled_percentile_floor() -> None:
    # 5 runs of 16: p99 of 80 interpolates between the two largest values, so it is at least
    # the second largest of the runs' floors.
    assert pooled_percentile_floor([1.8, 1.7, 1.9, 1.75, 1.6], 80, 99) == 1.8
    assert pooled_percentile_floor([1.8], 16, 99) is None
    assert pooled_percentile_floor([1.8], 16, 100) == 1.8
    with pytest.raises(ValueError, match="cannot pool"):
        pooled_percentile_floor([1.0, 1.0], 1, 99)


def test_pooled_floor_holds_for_sampled_runs() -> None:
    rng = random.Random(11)
    for _ in range(200):
        runs = [[rng.uniform(1.0, 3.0) for _ in range(16)] for _ in range(rng.randint(1, 6))]
        floors = [max(run) - rng.uniform(0, 0.5) for run in runs]  # each run's worst is above
        pooled = [v for run in runs for v in run]
        floor = pooled_percentile_floor(floors, len(pooled), 99)
        if floor is not None:
            assert percentile(pooled, 99) >= floor
