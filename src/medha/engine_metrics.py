"""EngineMetrics: an engine's Prometheus metrics (`Engine.metrics`), for dashboards and alerts.

Where medha measures what vLLM does, the name is vLLM's with `medha:` for `vllm:`
(`medha:time_to_first_token_seconds`, `medha:num_requests_running`, `medha:kv_cache_usage_perc`,
...; docs/engine.md lists the differences). Medha adds what its scheduler is judged by: whether
first tokens come by their deadlines (`medha:first_token_deadline_total`,
`medha:first_token_deadline_ratio`), how well iterations keep to their predicted times, and
its between-layer pauses.

Every metric has the label `model_name`. The engine's scheduler actor records requests and
iterations as they happen, on the event loop (a few microseconds a token); the gauges are read
from `Engine.stats()` when the registry is collected (on the engine's loop, whichever thread
collects). The registry is the engine's own, so two engines in one process never clash: serve
it with `render()` (medha's server does, at /metrics), or with prometheus_client's own means.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from medha.engine_stats import EngineStats
from medha.errors import MedhaError
from medha.log import get_logger
from medha.request import RequestMetrics

if TYPE_CHECKING:
    from medha.engine import Engine

_log = get_logger(__name__)

# Long contexts make for long first tokens: a 1M-token prefill takes minutes on one GPU.
_LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
_TOKEN_LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2),
    *(0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
)
_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What `EngineMetrics.render()` writes: Prometheus's text format 0.0.4, which every Prometheus
scrapes whatever it asks for. Not OpenMetrics: prometheus_client 0.26 writes it with `medha:`
turned into `medha_` on the sample lines but not in `# TYPE`, which scrapers reject."""
RATIO_CAP = 1000.0
"""Ratios above it count as it: one absurd deadline (1e-300 s) cannot swamp a sum for good."""
_TOKEN_COUNT_BUCKETS = tuple(float(2**k) for k in range(21))  # 1 .. 1M tokens

FINISH_REASONS = ("stop", "length", "abort", "error")
"""`medha:request_success_total`'s finished_reason values: "error" is a request the engine
ended with an exception (it failed or was stopped)."""


class EngineMetrics:
    """The Prometheus metrics of one engine, in `registry`.

    `stats`: the engine's stats now, or None while it is not running (then only the counters
    and histograms are collected)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(model_name, stats))
        label = ["model_name"]

        def counter(name: str, doc: str, *more: str) -> Counter:
            return Counter(f"medha:{name}", doc, [*label, *more], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            made = Histogram(f"medha:{name}", doc, label, registry=self.registry, buckets=buckets)
            return made.labels(model_name)

        self._prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens of requests that got their first token."
        ).labels(model_name)
        self._generation_tokens = counter("generation_tokens", "Tokens generated.").labels(
            model_name
        )
        self._prefill_tokens = counter(
            "prefill_tokens_computed",
            "Prompt (and recomputed) tokens run through the model; prefix cache hits are not.",
        ).labels(model_name)
        self._finished = counter("request_success", "Requests ended, by why.", "finished_reason")
        for reason in FINISH_REASONS:  # each shows from the start, at 0
            self._finished.labels(model_name, reason)
        deadlines = counter(
            "first_token_deadline",
            "Requests whose first token came by its deadline (met), or did not: it came late, "
            "or the request ended without one after the deadline had passed (missed).",
            "outcome",
        )
        self._deadline_met = deadlines.labels(model_name, "met")
        self._deadline_missed = deadlines.labels(model_name, "missed")
        self._ttft = histogram(
            "time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self._deadline_ratio = histogram(
            "first_token_deadline_ratio",
            "Time to first token over the request's deadline (<= 1: met).",
            _RATIO_BUCKETS,
        )
        self._inter_token = histogram(
            "inter_token_latency_seconds", "Time between two tokens of a request.",
            _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self._tpot = histogram(
            "request_time_per_output_token_seconds",
            "A request's mean time per output token after its first.",
            _TOKEN_LATENCY_BUCKETS,
        )
        self._e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to the request's end.", _LATENCY_BUCKETS
        )
        self._request_prompt = histogram(
            "request_prompt_tokens", "Prompt tokens of ended requests.", _TOKEN_COUNT_BUCKETS
        )
        self._request_generation = histogram(
            "request_generation_tokens", "Tokens generated by ended requests.",
            _TOKEN_COUNT_BUCKETS,
        )  # fmt: skip
        self._iteration = histogram(
            "iteration_seconds", "Time of one iteration (a batch through the model).",
            _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self._iteration_tokens = histogram(
            "iteration_tokens", "Tokens of one iteration's batch.", _TOKEN_COUNT_BUCKETS
        )
        self._prediction = histogram(
            "iteration_time_prediction_ratio",
            "An iteration's measured time over the cost model's prediction.",
            _RATIO_BUCKETS,
        )

    @classmethod
    def of(cls, engine: Engine, model_name: str) -> EngineMetrics | None:
        """The metrics of `engine`, which they do not keep alive; None where its config has
        them off (enable_metrics)."""
        if not engine.config.enable_metrics:
            return None
        stats_of = weakref.WeakMethod(engine.stats)

        def stats() -> EngineStats | None:
            method = stats_of()
            try:
                return None if method is None else method()
            except MedhaError:  # not started, stopped or failed
                return None
            except Exception as exc:  # its loop too busy to answer, or closed meanwhile
                _log.warning("metrics collected without the engine's stats", error=repr(exc))
                return None

        return cls(model_name, stats)

    def render(self) -> bytes:
        """The registry in Prometheus's text format (Content-Type: `CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    # -- recorded by the scheduler actor ----------------------------------------------------------

    def token(self, metrics: RequestMetrics, prompt_tokens: int) -> None:
        """A request's token was sampled (after `metrics.record_token`, with its deadline
        final)."""
        self._generation_tokens.inc()
        times = metrics.token_times
        if len(times) > 1:
            self._inter_token.observe(times[-1] - times[-2])
            return
        self._prompt_tokens.inc(prompt_tokens)
        ttft = metrics.ttft
        assert ttft is not None, "a token was recorded"
        self._ttft.observe(ttft)
        ratio = ttft / metrics.deadline if metrics.deadline > 0 else math.inf
        self._deadline_ratio.observe(min(ratio, RATIO_CAP))
        (self._deadline_met if ttft <= metrics.deadline else self._deadline_missed).inc()

    def request_ended(self, metrics: RequestMetrics, reason: str, prompt_tokens: int) -> None:
        """A request the scheduler took ended: finished (stop, length), aborted or failed
        (error); `metrics.finished_time` is its end."""
        self._finished.labels(self.model_name, reason).inc()
        end = metrics.finished_time
        assert end is not None, "an ended request has its end time"
        self._e2e.observe(end - metrics.arrival)
        self._request_prompt.observe(prompt_tokens)
        self._request_generation.observe(metrics.num_output_tokens)
        if (tpot := metrics.tpot) is not None:
            self._tpot.observe(tpot)
        # Deadline 0: none yet (a default one is set when the scheduler takes the request).
        late = metrics.deadline > 0 and end - metrics.arrival > metrics.deadline
        if metrics.first_token_time is None and late:
            self._deadline_missed.inc()  # e.g. a client that gave up waiting

    def iteration(self, seconds: float, predicted: float, tokens: int, decodes: int) -> None:
        """An iteration ran `tokens` tokens (`decodes` of them decodes) in `seconds`."""
        self._iteration.observe(seconds)
        self._iteration_tokens.observe(tokens)
        self._prefill_tokens.inc(tokens - decodes)
        if predicted > 0:
            self._prediction.observe(min(seconds / predicted, RATIO_CAP))


class _StatsCollector:
    """The gauges and counters that `Engine.stats()` holds, read at each collection."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        used = stats.total_blocks - stats.free_blocks
        usage = used / stats.total_blocks if stats.total_blocks else 0.0
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        # One row a metric: (kind, name, help, value). Longer descriptions: docs/engine.md.
        families = [
            (gauge, "num_requests_running", "Requests prefilling or decoding.", stats.running),
            (gauge, "num_requests_waiting", "Requests waiting for a first chunk.", stats.waiting),
            (gauge, "num_requests_preempted", "Preempted, to be recomputed.", stats.preempted),
            (gauge, "kv_cache_usage_perc", "KV blocks in use (1 = full).", usage),
            (gauge, "kv_cache_total_blocks", "KV blocks in all.", stats.total_blocks),
            (gauge, "prefix_cache_blocks", "KV blocks in the prefix cache.", stats.cached_blocks),
            (gauge, "cost_time_scale", "Measured over calibrated time.", stats.time_scale),
            (counter, "num_preemptions", "Requests' KV freed for others.", stats.preemptions),
            (counter, "iteration_pauses", "Iterations paused for a newer one.", stats.pauses),
            (
                counter,
                "prefix_cache_hit_tokens",
                "Prompt tokens taken from the prefix cache instead of computed.",
                stats.prefix_cache_hit_tokens,
            ),
        ]
        for family, name, doc, value in families:
            metric = family(f"medha:{name}", doc, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric
