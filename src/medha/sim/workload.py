"""Workloads for the simulator: lists of requests with arrival times and token counts.

* `synthetic_workload`: Poisson arrivals at a given QPS, lengths drawn from a trace
  (medha.sim.traces), optionally with a fraction of long requests from `PAPER_LONG_MIX`.
* `read_requests_csv`: a user's CSV (arrival_time, prompt_tokens, output_tokens, optional
  deadline and label).

The long mix follows the Medha paper's long requests: prefill P50 393K / P90 839K tokens,
decode P50 518 / P90 808 tokens. We fit a lognormal to each pair of quantiles:
median m and P90 q give mu = ln m and sigma = ln(q / m) / z_0.9 with z_0.9 = 1.2816, i.e.
sigma = 0.592 for prefills and 0.347 for decodes. Prompts are then clipped so that prompt +
output fits a 1M-token (2^20) context window, the longest context the paper serves
Llama-3-8B with; that clips about 5% of long prompts and leaves the median and P90 unchanged.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from medha.errors import MedhaError
from medha.sim.traces import TraceLengths

Z_90 = 1.2815515655446004
"""The standard normal's 0.9 quantile."""


class WorkloadError(MedhaError, ValueError):
    """A workload description is invalid (bad CSV, impossible parameters)."""


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a workload."""

    request_id: str
    arrival: float
    """Seconds since the start of the run."""
    prompt_tokens: int
    output_tokens: int
    """Tokens it generates (the simulated model stops exactly there)."""
    deadline: float | None = None
    """TTFT deadline in seconds after arrival; None: the scheduler's default rule."""
    label: str = "short"
    """Workload class ("short", "long", or a CSV's label): metrics are also split by it."""


@dataclass(frozen=True)
class LogNormalLengths:
    """Token counts from a lognormal fitted to a median and a P90, clipped to [low, high]."""

    median: float
    p90: float
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.median < self.p90:
            raise WorkloadError(f"need 0 < median < p90, got {self.median} and {self.p90}")

    @property
    def mu(self) -> float:
        return math.log(self.median)

    @property
    def sigma(self) -> float:
        return math.log(self.p90 / self.median) / Z_90

    def sample(self, rng: random.Random, high: int | None = None) -> int:
        """One draw, rounded and clipped to [low, min(high, self.high)]."""
        value = round(rng.lognormvariate(self.mu, self.sigma))
        limits = [limit for limit in (self.high, high) if limit is not None]
        return max(self.low, min([value, *limits]))


@dataclass(frozen=True)
class LongRequestMix:
    """The length distribution of long requests."""

    prefill: LogNormalLengths
    decode: LogNormalLengths
    max_context: int
    """Prompt + output never exceeds this (prompts are clipped to fit)."""

    def sample(self, rng: random.Random) -> tuple[int, int]:
        """(prompt tokens, output tokens) of one long request."""
        output = self.decode.sample(rng)
        return self.prefill.sample(rng, high=self.max_context - output), output


PAPER_LONG_MIX = LongRequestMix(
    prefill=LogNormalLengths(median=393_000, p90=839_000, low=32_768),
    decode=LogNormalLengths(median=518, p90=808, low=1, high=4096),
    max_context=1 << 20,
)


def poisson_arrivals(count: int, qps: float, rng: random.Random) -> list[float]:
    """`count` arrival times (seconds, from 0) of a Poisson process with rate `qps`."""
    if count < 0:
        raise WorkloadError(f"count must be >= 0, got {count}")
    if not qps > 0:
        raise WorkloadError(f"qps must be > 0, got {qps}")
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(qps)
        times.append(now)
    return times


def synthetic_workload(
    trace: TraceLengths,
    num_requests: int,
    qps: float,
    seed: int,
    long_fraction: float = 0.0,
    long_mix: LongRequestMix = PAPER_LONG_MIX,
) -> list[SimRequest]:
    """Poisson arrivals at `qps`; each request's lengths are a random row of `trace`, except
    exactly round(long_fraction x num_requests) requests at random positions, which are long.

    The same arguments always give the same list (a private `random.Random(seed)`).
    """
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be >= 1, got {num_requests}")
    if not 0.0 <= long_fraction <= 1.0:
        raise WorkloadError(f"long_fraction must be in [0, 1], got {long_fraction}")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(num_requests, qps, rng)
    num_long = int(long_fraction * num_requests + 0.5)
    long_positions = set(rng.sample(range(num_requests), num_long))
    requests = []
    for index, arrival in enumerate(arrivals):
        if index in long_positions:
            prompt, output = long_mix.sample(rng)
            label = "long"
        else:
            row = rng.randrange(len(trace))
            prompt, output = trace.prompt_tokens[row], trace.output_tokens[row]
            label = "short"
        requests.append(SimRequest(f"r{index:05d}", arrival, prompt, output, None, label))
    return requests
