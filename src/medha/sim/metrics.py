"""Per-request outcomes of a simulation and their summary statistics.

TTFT: first token time - arrival. TPOT: (finish - first token) / (output tokens - 1), the mean
time between a request's output tokens (undefined for one-token outputs). E2E: finish -
arrival. Deadline attainment: share of requests whose first token came by arrival + d_i (the
caller's deadline, else the scheduler's default max(1.5 x predicted prefill, 0.5 s)).
Throughput: finished requests (and their prompt + output tokens) over the span from the first
arrival to the last finish. Percentiles interpolate linearly between order statistics (numpy's
default), so p50 of [1, 2] is 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one finished request."""

    request_id: str
    label: str
    replica: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    deadline: float
    """d_i in seconds after arrival (given or default)."""
    first_token_time: float
    finish_time: float
    preemptions: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_tokens - 1)

    @property
    def met_deadline(self) -> bool:
        return self.first_token_time <= self.arrival + self.deadline


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class MetricsSummary:
    """Latency percentiles (seconds), throughput and deadline attainment of a set of requests."""

    requests: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    e2e_p50: float
    e2e_p99: float
    throughput_rps: float
    throughput_tokens_per_s: float
    deadline_attainment: float
    """Fraction in [0, 1] of requests whose first token met its deadline."""
    preemptions: int

    def to_dict(self) -> dict[str, float | int | None]:
        # JSON has no NaN: an undefined statistic (no requests) is written as null.
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in asdict(self).items()
        }


def summarize(records: Iterable[RequestRecord]) -> MetricsSummary:
    """Summary statistics of `records` (NaN where a statistic has no data)."""
    records = list(records)
    ttft = [r.ttft for r in records]
    tpot = [t for r in records if (t := r.tpot) is not None]
    e2e = [r.e2e for r in records]
    span = 0.0
    if records:
        span = max(r.finish_time for r in records) - min(r.arrival for r in records)
    tokens = sum(r.prompt_tokens + r.output_tokens for r in records)
    return MetricsSummary(
        requests=len(records),
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        tpot_p50=percentile(tpot, 50),
        tpot_p90=percentile(tpot, 90),
        tpot_p99=percentile(tpot, 99),
        e2e_p50=percentile(e2e, 50),
        e2e_p99=percentile(e2e, 99),
        throughput_rps=len(records) / span if span > 0 else math.nan,
        throughput_tokens_per_s=tokens / span if span > 0 else math.nan,
        deadline_attainment=(
            sum(r.met_deadline for r in records) / len(records) if records else math.nan
        ),
        preemptions=sum(r.preemptions for r in records),
    )
