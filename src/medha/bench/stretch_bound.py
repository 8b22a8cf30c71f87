"""The least worst slowdown any schedule could give a set of requests, one prefill at a time.

A short request's slowdown is its TTFT over its TTFT alone. When two chats arrive together,
one of them waits for the other whatever the policy: on the 2-core CPU of
`benchmarks/mixed_cpu.py` two 256-token chats 51 ms apart (0.3 s each alone) leave the later
finisher at (0.6 - 0.051) / 0.3 = 1.83 at best. This module computes that floor for a whole
trace, so a benchmark can say how much of a measured slowdown was the policy's doing.

The model: one server runs one request's prefill at a time, may preempt at any moment, and a
request needs exactly its alone time of work. Minimising the largest slowdown ("max stretch")
is then exact: a slowdown S is achievable iff every request j can finish by its arrival plus
S x its work, and preemptive earliest-deadline-first meets a set of deadlines on one machine
whenever any schedule does; so bisect on S with an EDF check.

What the model leaves out makes the real floor higher, not lower, with one exception: it
charges nothing for decodes that ride along, for the in-flight iteration a newcomer waits for
or for per-iteration overhead; but a real batch can run two prefills side by side a little
cheaper than one after the other (on that CPU, 2 x 128 tokens in one step took 246 ms against
2 x 140 ms), which the model does not credit.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

_RELATIVE_SLACK = 1e-12
"""Rounding allowance, relative to the times involved, when a job is said to have no work left
or to finish by its deadline: sums of floats are not exact."""


def least_worst_slowdown(
    arrivals: Sequence[float], works: Sequence[float], tolerance: float = 1e-6
) -> float:
    """The smallest S such that some preemptive one-at-a-time schedule finishes every request
    j by arrivals[j] + S * works[j] (works: seconds alone, > 0). 1.0 when no two overlap.
    From below, within `tolerance` (relative): no schedule achieves less than the value."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    if len(arrivals) != len(works):
        raise ValueError(f"{len(arrivals)} arrivals but {len(works)} works")
    if any(w <= 0 or not math.isfinite(w) for w in works):
        raise ValueError("every work must be positive and finite")
    if any(not math.isfinite(a) for a in arrivals):
        raise ValueError("every arrival must be finite")
    if not arrivals:
        return 1.0
    # Time from the first arrival: schedules are translation invariant, and small numbers keep
    # the rounding small.
    first = min(arrivals)
    jobs = sorted((arrival - first, work) for arrival, work in zip(arrivals, works, strict=True))
    if _edf_meets(jobs, 1.0):
        return 1.0
    low, high = 1.0, _fcfs_worst(jobs)  # first come first served is one schedule
    while high - low > tolerance * low:
        middle = (low + high) / 2
        if _edf_meets(jobs, middle):
            high = middle
        else:
            low = middle
    return low


def _fcfs_worst(jobs: list[tuple[float, float]]) -> float:
    now, worst = 0.0, 1.0
    for arrival, work in jobs:
        now = max(now, arrival) + work
        worst = max(worst, (now - arrival) / work)
    return worst


def _edf_meets(jobs: list[tuple[float, float]], slowdown: float) -> bool:
    """Whether preemptive EDF finishes each (arrival, work) by arrival + slowdown * work.
    `jobs` sorted by arrival."""
    ready: list[tuple[float, float]] = []  # (deadline, work left)
    now, index = 0.0, 0
    while index < len(jobs) or ready:
        if not ready:
            now = max(now, jobs[index][0])
        while index < len(jobs) and jobs[index][0] <= now:
            arrival, work = jobs[index]
            heapq.heappush(ready, (arrival + slowdown * work, work))
            index += 1
        deadline, left = heapq.heappop(ready)
        next_arrival = jobs[index][0] if index < len(jobs) else math.inf
        ran = min(left, next_arrival - now)
        now += ran
        slack = _RELATIVE_SLACK * (now + left)
        if left - ran > slack:
            heapq.heappush(ready, (deadline, left - ran))
        elif now > deadline + slack:
            return False
    return True


def pooled_percentile_floor(worst_floors: Sequence[float], total: int, q: float) -> float | None:
    """A floor under the q-th percentile (linear interpolation, as
    `medha.sim.metrics.percentile`) of `total` values pooled from runs, run r holding at least
    one value >= worst_floors[r] (its worst request against `least_worst_slowdown`).

    The percentile is at least the sorted values' element at floor((total - 1) * q / 100),
    which is at least b whenever `total - that index` values are >= b; the runs with the
    largest floors supply one each. None when there are too few runs to say anything (one run
    of 16 requests: its p99 sits below its worst value)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if total < len(worst_floors):
        raise ValueError(f"{len(worst_floors)} runs cannot pool {total} values")
    needed = total - math.floor((total - 1) * q / 100)
    if needed > len(worst_floors):
        return None
    return sorted(worst_floors, reverse=True)[needed - 1]
