"""What Engine.metrics (Prometheus) costs: the same requests with EngineConfig.enable_metrics on
and off, same run.

The metrics are recorded on the event loop, per token and per iteration, between model steps:
their cost adds to every step where the loop's work is not hidden behind the model's. The
worst case is a model whose steps cost next to nothing, so this runs the tiny random model
("tiny-random", 2 layers) with BATCH requests sent at once, greedy, exactly MAX_TOKENS tokens
each (ignore_eos): the scheduler actor's own work per token is most of each step. On and off
alternate, ROUNDS pairs, the first of each pair switching; a ratio is on's tokens per second
over off's in the same pair. Then the recording calls alone, timed in a loop, and one scrape.

    python benchmarks/metrics_overhead.py [--json benchmarks/results/metrics_overhead.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

import anyio
import torch

import medha
from medha.engine_metrics import EngineMetrics
from medha.request import RequestMetrics

MODEL = "tiny-random"
BATCH = 128
MAX_TOKENS = 64
ROUNDS = 8
CALLS = 200_000


async def tokens_per_second(enable_metrics: bool) -> float:
    config = medha.EngineConfig(model=MODEL, num_blocks=2048, enable_metrics=enable_metrics)
    params = medha.SamplingParams.greedy(MAX_TOKENS, ignore_eos=True)
    async with medha.Engine(config) as engine:
        await engine.generate([1, 2, 3], params)  # warm up
        # The engines closed before this one left reference cycles (exception tracebacks): a
        # full collection inside every other timed run would cost ~0.2 s of a ~1 s run, and
        # the on/off ratio would follow the runs' order, not the metrics.
        gc.collect()
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for index in range(BATCH):
                group.start_soon(engine.generate, [1 + index % 50, 2, 3], params)
        return BATCH * MAX_TOKENS / (time.perf_counter() - started)


async def engine_runs() -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(ROUNDS):
        order = ("on", "off") if index % 2 == 0 else ("off", "on")
        for name in order:
            runs[name].append(await tokens_per_second(name == "on"))
        print(f"done: pair {index + 1} of {ROUNDS}", flush=True)
    return runs


def recording_costs() -> dict[str, float]:
    """Microseconds per call of what the scheduler actor records, and milliseconds a scrape."""
    metrics = EngineMetrics("bench", lambda: None)
    request = RequestMetrics(arrival=0.0, deadline=1.0)
    request.record_token(0.1)
    metrics.token(request, 100)

    def next_token() -> None:
        request.token_times.append(request.token_times[-1] + 0.02)
        metrics.token(request, 100)

    per_token = timeit.timeit(next_token, number=CALLS) / CALLS
    per_iteration = timeit.timeit(lambda: metrics.iteration(0.1, 0.09, 300, 20), number=CALLS)
    ended = _ended(request)
    per_end = timeit.timeit(lambda: metrics.request_ended(ended, "stop", 100), number=CALLS)
    scrape = timeit.timeit(metrics.render, number=200) / 200
    return {
        "token_us": per_token * 1e6,
        "iteration_us": per_iteration / CALLS * 1e6,
        "request_end_us": per_end / CALLS * 1e6,
        "scrape_ms": scrape * 1e3,
    }


def _ended(request: RequestMetrics) -> RequestMetrics:
    ended = RequestMetrics(arrival=0.0, deadline=1.0)
    ended.record_token(0.1)
    ended.record_token(0.2)
    ended.finished_time = 0.2
    return ended


def report(result: dict[str, Any]) -> str:
    runs, costs = result["runs"], result["costs"]
    ratios = [on / off for on, off in zip(runs["on"], runs["off"], strict=True)]
    lines = [
        f"workload: {BATCH} requests x {MAX_TOKENS} tokens at once, {MODEL}, "
        f"{ROUNDS} on/off pairs; {result['machine']}",
        f"{'metrics':<10}{'tok/s p50':>12}{'min':>10}{'max':>10}",
    ]
    for name in ("off", "on"):
        values = runs[name]
        lines.append(
            f"{name:<10}{statistics.median(values):>12.0f}{min(values):>10.0f}{max(values):>10.0f}"
        )
    lines.append(
        f"on / off, per pair: median {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    lines.append(
        f"recording alone: {costs['token_us']:.2f} us a token, {costs['iteration_us']:.2f} us "
        f"an iteration, {costs['request_end_us']:.2f} us a request's end; "
        f"a scrape {costs['scrape_ms']:.2f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the runs here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "runs": anyio.run(engine_runs),
        "costs": recording_costs(),
    }
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
