"""The Medha paper's headline comparison, reproduced in the discrete-event simulator.

Llama-3-8B on 16 A100-80GB as TP8 x SPP2, ShareGPT (capped at 8K tokens) plus 5% long
requests (prefill P50 393K / P90 839K, decode P50 518 / P90 808), Poisson arrivals at 0.25,
0.75, 1.25 and 1.75 QPS; policies lars, fcfs (non-preemptive), edf, lrs and Sarathi-style
fcfs-chunked with 512- and 2048-token chunks. Every policy sees the identical request list at a
given QPS; the lists at different QPS differ only by a time scale (same seed).

Reports lars vs fcfs median and P99 TTFT ratios, the capacity ratio (highest QPS meeting an
SLO, by bisection) and the saturated-throughput ratio, next to the paper's 30x, 174x and 5.7x,
plus how much the ratios move with the workload's seed.

Run (about 5 minutes on one core):

    .venv/bin/python benchmarks/paper_comparison.py [--num-requests 500] [--out benchmarks/results]

Writes paper_comparison.json, paper_comparison.md and paper_comparison/*.png under --out, and
copies the PNGs to --docs-images for docs/simulator.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medha.perf import A100_80GB, LLAMA_3_8B, ReplicaSpec
from medha.sim import Deployment, SimResult, TraceLengths, load_trace, synthetic_workload
from medha.sim.plots import plot_chunk_sizes, plot_metric_vs_qps, plot_ttft_cdf
from medha.sim.report import print_results, results_json, write_json
from medha.sim.runs import PolicyRun, run_policies

QPS = (0.25, 0.75, 1.25, 1.75)
POLICIES = ("lars", "fcfs", "edf", "lrs", "fcfs-chunked:512", "fcfs-chunked:2048")
CHUNK_PLOT_POLICIES = ("lars", "fcfs", "fcfs-chunked:2048")
LONG_FRACTION = 0.05
DEPLOYMENT = Deployment(LLAMA_3_8B, A100_80GB, ReplicaSpec(tp=8, pp=2))
PAPER = {"median_ttft_ratio": 30.0, "p99_ttft_ratio": 174.0, "capacity_ratio": 5.7}

SLO_P90_TTFT_S = 10.0
MIN_ATTAINMENT = 0.9
CAPACITY_RANGE = (0.01, 2.0)
VARIANCE_SEEDS = (1, 2)
VARIANCE_QPS = (0.25, 0.75)

Criterion = Callable[[SimResult], bool]
CRITERIA: dict[str, tuple[str, Criterion]] = {
    "p90_ttft": (
        f"P90 TTFT <= {SLO_P90_TTFT_S:g} s (all requests)",
        lambda r: r.summary().ttft_p90 <= SLO_P90_TTFT_S,
    ),
    "attainment": (
        f">= {MIN_ATTAINMENT:.0%} of requests meet their own TTFT deadline",
        lambda r: r.summary().deadline_attainment >= MIN_ATTAINMENT,
    ),
}


class Bench:
    """Runs each (policy, QPS, seed) once on the seeded workload and remembers the result."""

    def __init__(self, trace: TraceLengths, num_requests: int) -> None:
        self.trace, self.num_requests = trace, num_requests
        self._runs: dict[tuple[str, float, int], PolicyRun] = {}

    def run(self, policies: Sequence[str], qps: float, seed: int = 0) -> list[PolicyRun]:
        missing = [p for p in policies if (p, qps, seed) not in self._runs]
        if missing:
            requests = synthetic_workload(self.trace, self.num_requests, qps, seed, LONG_FRACTION)
            for run in run_policies(DEPLOYMENT, missing, requests):
                self._runs[run.spec, qps, seed] = run
        return [self._runs[p, qps, seed] for p in policies]

    def capacity(self, policy: str, criterion: Criterion, probes: int) -> dict[str, Any]:
        """Bisection (on log QPS: capacities differ by orders of magnitude) for the highest QPS
        in CAPACITY_RANGE meeting `criterion`, assumed to hold below some load and fail above."""

        def ok(qps: float) -> bool:
            return criterion(self.run([policy], qps)[0].result)

        low, high = CAPACITY_RANGE
        if not ok(low):
            return {"qps": None, "below": low}
        if ok(high):
            return {"qps": high, "at_least": True}
        for _ in range(probes):
            middle = round(math.sqrt(low * high), 4)
            low, high = (middle, high) if ok(middle) else (low, middle)
        return {"qps": low, "fails_at": high}


def ttft_ratios(runs: Sequence[PolicyRun]) -> dict[str, float]:
    """fcfs / lars TTFT ratios: median and P99, over all requests and over short ones."""
    by_spec = {run.spec: run.result for run in runs}
    fcfs, lars = by_spec["fcfs"], by_spec["lars"]
    ratios = {}
    for label, name in ((None, ""), ("short", "short_")):
        slow, fast = fcfs.summary(label), lars.summary(label)
        ratios[f"{name}median"] = slow.ttft_p50 / fast.ttft_p50
        ratios[f"{name}p99"] = slow.ttft_p99 / fast.ttft_p99
    return ratios


def capacity_cell(found: dict[str, Any]) -> str:
    if found["qps"] is None:
        return f"< {found['below']:g}"
    return f">= {found['qps']:g}" if found.get("at_least") else f"{found['qps']:.3g}"


def capacity_ratio(lars: dict[str, Any], fcfs: dict[str, Any]) -> str:
    if lars["qps"] is None or fcfs["qps"] is None:
        return "n/a"
    bound = ">= " if lars.get("at_least") else ""
    return f"{bound}{lars['qps'] / fcfs['qps']:.1f}x"


def markdown(
    grid: dict[float, list[PolicyRun]],
    ratios: dict[float, dict[str, float]],
    variance: dict[str, dict[str, float]],
    capacity: dict[str, dict[str, dict[str, Any]]],
    saturation: dict[str, float],
    trace: TraceLengths,
    num_requests: int,
) -> str:
    lines = [
        "# Paper comparison (simulated)",
        "",
        f"Llama-3-8B, 16 x A100-80GB as TP8 x SPP2; ShareGPT (`{trace.source.name}`"
        f"{', bundled sample' if trace.is_sample else ''}) + {LONG_FRACTION:.0%} long requests; "
        f"{num_requests} requests per run, seed 0; target batch time 50 ms. Generated by "
        "`benchmarks/paper_comparison.py`.",
        "",
        "| QPS | policy | TTFT p50 s | TTFT p90 s | TTFT p99 s | short TTFT p99 s | "
        "TPOT p50 ms | TPOT p99 ms | E2E p50 s | req/s | deadline met % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for qps, runs in grid.items():
        for run in runs:
            s, short = run.result.summary(), run.result.summary("short")
            lines.append(
                f"| {qps:g} | {run.spec} | {s.ttft_p50:.3g} | {s.ttft_p90:.3g} | "
                f"{s.ttft_p99:.3g} | {short.ttft_p99:.3g} | {s.tpot_p50 * 1e3:.3g} | "
                f"{s.tpot_p99 * 1e3:.3g} | {s.e2e_p50:.3g} | {s.throughput_rps:.3g} | "
                f"{s.deadline_attainment * 100:.1f} |"
            )
    lines += [
        "",
        "## lars vs fcfs (non-preemptive): TTFT ratios fcfs / lars",
        "",
        "| QPS | median | P99 | short requests: median | short requests: P99 |",
        "|---|---|---|---|---|",
    ]
    for qps, r in ratios.items():
        lines.append(
            f"| {qps:g} | {r['median']:.1f}x | {r['p99']:.1f}x | {r['short_median']:.1f}x | "
            f"{r['short_p99']:.1f}x |"
        )
    lines.append(f"| paper | {PAPER['median_ttft_ratio']:g}x | {PAPER['p99_ttft_ratio']:g}x | | |")
    lines += [
        "",
        f"Seed sensitivity (seeds 0, {', '.join(map(str, VARIANCE_SEEDS))}): min - max of the ratio.",
        "",
        "| QPS | median | P99 | short requests: median | short requests: P99 |",
        "|---|---|---|---|---|",
    ]
    for qps, spread in variance.items():
        cells = [
            f"{spread[f'{key}_min']:.1f}x - {spread[f'{key}_max']:.1f}x"
            for key in ("median", "p99", "short_median", "short_p99")
        ]
        lines.append(f"| {qps} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Capacity (highest QPS meeting the criterion; bisection on log QPS in "
        f"[{CAPACITY_RANGE[0]:g}, {CAPACITY_RANGE[1]:g}])",
        "",
        "| criterion | lars | fcfs | lars / fcfs | paper |",
        "|---|---|---|---|---|",
    ]
    for key, (description, _) in CRITERIA.items():
        lars, fcfs = capacity["lars"][key], capacity["fcfs"][key]
        lines.append(
            f"| {description} | {capacity_cell(lars)} | {capacity_cell(fcfs)} | "
            f"{capacity_ratio(lars, fcfs)} | {PAPER['capacity_ratio']}x |"
        )
    lines.append(
        f"| saturated throughput (req/s at {max(QPS):g} QPS) | {saturation['lars']:.3g} | "
        f"{saturation['fcfs']:.3g} | {saturation['lars'] / saturation['fcfs']:.1f}x | |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--probes", type=int, default=6, help="bisection steps per capacity")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--docs-images", type=Path, default=Path("docs/images/simulator"))
    args = parser.parse_args()
    started = time.perf_counter()
    trace = load_trace("sharegpt")
    print(f"trace: {trace.source}{' (bundled sample!)' if trace.is_sample else ''}")
    bench = Bench(trace, args.num_requests)

    grid = {qps: bench.run(POLICIES, qps) for qps in QPS}
    for qps, runs in grid.items():
        print_results(runs, f"{qps:g} QPS")
    ratios = {qps: ttft_ratios(runs) for qps, runs in grid.items()}
    variance = {}
    for qps in VARIANCE_QPS:
        samples = [ratios[qps]] + [
            ttft_ratios(bench.run(("lars", "fcfs"), qps, seed)) for seed in VARIANCE_SEEDS
        ]
        variance[f"{qps:g}"] = {
            f"{key}_{name}": pick(sample[key] for sample in samples)
            for key in samples[0]
            for name, pick in (("min", min), ("max", max))
        }
    capacity = {
        policy: {
            key: bench.capacity(policy, rule, args.probes) for key, (_, rule) in CRITERIA.items()
        }
        for policy in ("lars", "fcfs")
    }
    saturation = {run.spec: run.result.summary().throughput_rps for run in grid[max(QPS)]}

    setup = {
        "model": "llama-3-8b",
        **DEPLOYMENT.describe(),
        "spp": True,
        "target_batch_time": 0.05,
        "trace_file": str(trace.source),
        "trace_is_sample": trace.is_sample,
        "long_fraction": LONG_FRACTION,
        "num_requests": args.num_requests,
        "seed": 0,
    }
    payload = {
        "setup": setup,
        "runs": {f"{qps:g}": results_json({}, runs)["policies"] for qps, runs in grid.items()},
        "ttft_ratios_fcfs_over_lars": {f"{qps:g}": value for qps, value in ratios.items()},
        "ttft_ratio_spread_over_seeds": variance,
        "capacity_qps": capacity,
        "capacity_criteria": {key: description for key, (description, _) in CRITERIA.items()},
        "saturated_throughput_rps": saturation,
        "paper": PAPER,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "paper_comparison.json", payload)
    report = markdown(grid, ratios, variance, capacity, saturation, trace, args.num_requests)
    (args.out / "paper_comparison.md").write_text(report, encoding="utf-8")
    print(report)

    plots = args.out / "paper_comparison"
    plots.mkdir(exist_ok=True)
    paths = [
        plot_ttft_cdf(grid[0.75], plots / "ttft_cdf_0.75qps.png", "TTFT CDF at 0.75 QPS"),
        plot_ttft_cdf(grid[0.25], plots / "ttft_cdf_0.25qps.png", "TTFT CDF at 0.25 QPS"),
        plot_chunk_sizes(
            [run for run in grid[0.75] if run.spec in CHUNK_PLOT_POLICIES],
            plots / "chunk_sizes_0.75qps.png",
            "Prefill chunks of the longest requests at 0.75 QPS",
        ),
        plot_metric_vs_qps(grid, ["ttft_p50", "ttft_p99"], plots / "ttft_vs_qps.png", "TTFT (s)"),
        plot_metric_vs_qps(
            grid, ["tpot_p50", "tpot_p99"], plots / "tpot_vs_qps.png", "TPOT (ms)", scale=1e3
        ),
    ]
    args.docs_images.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, args.docs_images / path.name)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {args.out}/paper_comparison.{{json,md}} and {len(paths)} plots in {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
