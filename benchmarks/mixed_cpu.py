"""A long document among short chats on SmolLM2-135M, on this CPU: medha (lars, fcfs,
fcfs-chunked) vs OpenVINO GenAI's continuous-batching pipeline (dynamic split-fuse, default
budget) on the same GGUF, in one run.

Per system: short-request TTFT slowdown (TTFT over the same request's TTFT when it runs alone
on that system) p50/p99, long-request TTFT, TPOT p50/p99, output throughput. Prints a table and
writes JSON (default benchmarks/results/mixed_cpu.json). One more row runs the shorts under lars
with no long request: their slowdown from queueing behind each other alone, the floor. Under
the table, with --repeats 2 or more, the least possible short slowdown p99 of the trace: what
no schedule that runs one prefill at a time at its alone speed could beat (chats that arrive
together wait for each other; `medha.bench.stretch_bound`), and per run the worst slowdown
against its least possible value. A policy name with "-unpaused" appended (`--policies lars,lars-unpaused`)
runs it with EngineConfig.pause_iterations=False: no iteration stops between layers for a
newer request; with "-unguarded", EngineConfig.lead_guard=False: plain LARS, whose started
prefills take turns with newer ones (docs/scheduler.md, "The lead guard"). With "+lone" at
the end, EngineConfig.lone_batch_time=0.5: a prefill alone in the engine runs 0.5 s iterations.

With `--repeats N` every system plays the workload N times, alternating systems within each
round, and the percentiles pool the N x 16 short requests: on a shared machine the p99 of one
run's 16 shorts is its slowest one and moves by more than most changes do. The per-run p99s
and long TTFTs are kept in the JSON and printed under the table; long TTFT and throughput are
medians over the runs.

The alone TTFTs are measured on the same system right before and right after each play, and
each short's denominator is the mean of the two: this shared machine's speed drifts by up to
1.7x within an hour (the same attention call took 4.2 ms, then 7.3 ms; one minute's play moved
the median alone TTFT from 0.30 to 0.38 s), so a denominator measured once, or only before,
would put that drift into the slowdowns. The median alone TTFT per play and its after/before
ratio are printed, which shows the drift.

    OMP_NUM_THREADS=2 python benchmarks/mixed_cpu.py [--shorts 16] [--repeats 3] [--skip-openvino]

OpenVINO reads the Q4_1 GGUF itself (its own dequantization and int4 kernels); medha runs the
same file dequantized, in bf16 by default (`--dtype float32`: the runs exact to HF in fp32).
Greedy decoding, ignore-eos, same prompts (token ids) for both.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from medha.bench.engine_run import RequestResult, run_workload
from medha.bench.mixed_workload import MixedRequest, build_mixed_workload
from medha.bench.stretch_bound import least_worst_slowdown, pooled_percentile_floor
from medha.config import EngineConfig
from medha.engine import Engine
from medha.model.presets import smollm2_gguf_path
from medha.perf import save_profile
from medha.sim.metrics import percentile
from medha.sim.traces import trace_path

LONE_SUFFIX = "+lone"
LONE_BATCH_TIME_S = 0.5


def medha_config(system: str, args: Any, profile: Path) -> EngineConfig:
    """`system`: a policy name, optionally followed by "-unpaused" (iterations never pause
    between layers for a newly arrived request: EngineConfig.pause_iterations) and/or
    "-unguarded" (no lead guard: EngineConfig.lead_guard), then optionally "+lone" (0.5 s
    iterations for a prefill alone in the engine: EngineConfig.lone_batch_time)."""
    lone = system.endswith(LONE_SUFFIX)
    policy, *variants = system.removesuffix(LONE_SUFFIX).split("-un")  # no policy has "-un"
    unknown = set(variants) - {"paused", "guarded"}
    if unknown:
        raise ValueError(f"unknown system variant in {system!r}: {sorted(unknown)}")
    return EngineConfig(
        model="smollm2-135m",
        policy=policy,
        pause_iterations=False if "paused" in variants else None,
        lead_guard="guarded" not in variants,
        lone_batch_time=LONE_BATCH_TIME_S if lone else None,
        cost_profile=profile,
        target_batch_time=args.target_batch_time,
        fixed_chunk=args.fixed_chunk,
        online_time_scale=not args.no_online_time_scale,
        dtype=args.dtype,
        # The protocol measures scheduling: a repeated chat must not get its first token from a
        # cache its "alone" run filled (OpenVINO's pipeline runs without one by default too).
        enable_prefix_caching=False,
    )


async def medha_run(
    policy: str, workload: list[MixedRequest], args: Any, profile: Path
) -> tuple[list[RequestResult], float]:
    async with Engine(medha_config(policy, args, profile)) as engine:
        start = time.perf_counter()
        results = await run_workload(engine, workload)
        return results, time.perf_counter() - start


async def medha_alone(
    policy: str, workload: list[MixedRequest], args: Any, profile: Path
) -> dict[str, float]:
    """Each short request's TTFT on an idle engine with the same configuration: the
    denominator of its slowdown, so every system is compared with itself."""
    alone: dict[str, float] = {}
    async with Engine(medha_config(policy, args, profile)) as engine:
        for request in workload:
            if request.kind == "short":
                rows = await run_workload(
                    engine, [MixedRequest(request.request_id, "short", 0.0, request.prompt_ids, 1)]
                )
                alone[request.request_id] = rows[0].ttft
    return alone


def openvino_run(
    workload: list[MixedRequest], alone: bool = False
) -> tuple[list[RequestResult], float]:
    """Play the workload on OpenVINO GenAI's ContinuousBatchingPipeline (arrival times honoured
    by a driver loop around pipe.step()); with `alone`, each short request by itself."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    pipe = genai.ContinuousBatchingPipeline(
        str(smollm2_gguf_path()), genai.SchedulerConfig(), "CPU"
    )
    if alone:
        results = []
        for request in workload:
            if request.kind == "short":
                rows, _ = _drive(
                    pipe,
                    [MixedRequest(request.request_id, "short", 0.0, request.prompt_ids, 1)],
                    np,
                    ov,
                    genai,
                )
                results.extend(rows)
        return results, 0.0
    return _drive(pipe, workload, np, ov, genai)


async def openvino_alone(workload: list[MixedRequest]) -> dict[str, float]:
    """Each short request's TTFT alone on OpenVINO GenAI."""
    rows, _ = await anyio.to_thread.run_sync(openvino_run, workload, True)
    return {r.request_id: r.ttft for r in rows}


def _drive(
    pipe: Any, workload: list[MixedRequest], np: Any, ov: Any, genai: Any
) -> tuple[list[RequestResult], float]:
    pending = sorted(workload, key=lambda r: r.arrival)
    handles: dict[int, tuple[MixedRequest, Any]] = {}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    count: dict[int, int] = {}
    done: dict[int, float] = {}
    start = time.perf_counter()
    next_id = 0
    while pending or len(done) < len(handles):
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            request = pending.pop(0)
            config = genai.GenerationConfig()
            config.max_new_tokens = request.max_tokens
            config.ignore_eos = True
            ids = ov.Tensor(np.array([request.prompt_ids], dtype=np.int64))
            handles[next_id] = (request, pipe.add_request(next_id, ids, config))
            next_id += 1
        if not pipe.has_non_finished_requests():
            if pending:
                time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - start)))
            continue
        pipe.step()
        now = time.perf_counter() - start
        for key, (_request, handle) in handles.items():
            if key in done:
                continue
            if handle.can_read():
                outputs = handle.read()
                produced = sum(len(o.generated_ids) for o in outputs.values())
                if produced:
                    first.setdefault(key, now)
                    last[key] = now
                    count[key] = count.get(key, 0) + produced
            if handle.get_status() == genai.GenerationStatus.FINISHED:
                done[key] = now
    wall = time.perf_counter() - start
    results = []
    for key, (request, _) in handles.items():
        n = count.get(key, 0)
        ttft = first[key] - request.arrival
        tpot = (last[key] - first[key]) / (n - 1) if n > 1 else None
        results.append(
            RequestResult(
                request.request_id,
                request.kind,
                request.arrival,
                request.arrival,  # TTFT counts from the arrival: the step in flight is the wait
                ttft,
                tpot,
                done[key] - request.arrival,
                n,
                (),
                True,
            )
        )
    return results, wall


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}s"


@dataclass(frozen=True)
class Run:
    """One play of the workload on one system."""

    rows: list[RequestResult]
    wall: float
    before: dict[str, float]
    """Each short request's TTFT alone on the same system, measured right before the play..."""
    after: dict[str, float]
    """...and right after it."""

    @property
    def alone(self) -> dict[str, float]:
        """The slowdown's denominator: the mean of the two."""
        return {
            key: (value + self.after[key]) / 2
            for key, value in self.before.items()
            if key in self.after
        }

    @property
    def least_worst_slowdown(self) -> float:
        """The smallest worst short slowdown any one-prefill-at-a-time schedule of this play's
        shorts could give, each submitted when it was and costing its alone TTFT
        (medha.bench.stretch_bound)."""
        alone = self.alone
        shorts = [r for r in self.rows if r.kind == "short" and alone.get(r.request_id)]
        return least_worst_slowdown(
            [r.submitted for r in shorts], [alone[r.request_id] for r in shorts]
        )

    @property
    def drift(self) -> float:
        """How much slower the system ran alone after the play than before it (median)."""
        return statistics.median(self.after.values()) / statistics.median(self.before.values())


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Percentiles over the requests of every run pooled, each short's slowdown against its
    alone TTFT of the same run; long TTFT and throughput: medians over the runs; per-run p99
    slowdowns, long TTFTs and median alone TTFTs listed."""

    def slowdowns(rows: list[RequestResult], alone: dict[str, float]) -> list[float]:
        return [
            r.ttft / alone[r.request_id]
            for r in rows
            if r.kind == "short" and alone.get(r.request_id)
        ]

    per_run = [slowdowns(run.rows, run.alone) for run in runs]
    pooled = [s for run in per_run for s in run]
    floors = [run.least_worst_slowdown for run in runs]
    rows = [row for run in runs for row in run.rows]
    shorts = [r for r in rows if r.kind == "short"]
    tpots = [r.tpot for r in rows if r.tpot is not None]
    long_ttfts = [
        max((r.ttft for r in run.rows if r.kind == "long"), default=math.nan) for run in runs
    ]
    return {
        "runs": len(runs),
        "short_slowdown_p50": percentile(pooled, 50),
        "short_slowdown_p99": percentile(pooled, 99),
        "short_slowdown_p99_per_run": [percentile(run, 99) for run in per_run],
        "short_slowdown_worst_per_run": [max(run, default=math.nan) for run in per_run],
        "short_slowdown_least_worst_per_run": floors,
        "short_slowdown_p99_least_possible": pooled_percentile_floor(floors, len(pooled), 99),
        "short_ttft_p50": percentile([r.ttft for r in shorts], 50),
        "short_ttft_p99": percentile([r.ttft for r in shorts], 99),
        "alone_ttft_median_per_run": [statistics.median(run.alone.values()) for run in runs],
        "alone_drift_per_run": [run.drift for run in runs],
        "shorts_per_run": [
            [
                {"id": r.request_id, "ttft": r.ttft, "alone": run.alone.get(r.request_id)}
                for r in run.rows
                if r.kind == "short"
            ]
            for run in runs
        ],
        "long_ttft": statistics.median(long_ttfts),
        "long_ttft_per_run": long_ttfts,
        "tpot_p50": percentile(tpots, 50),
        "tpot_p99": percentile(tpots, 99),
        "throughput_tok_s": statistics.median(
            sum(r.output_tokens for r in run.rows) / run.wall for run in runs
        ),
    }


async def main(args: Any) -> None:
    profile = args.profile
    calibrate = EngineConfig(model="smollm2-135m", calibration_seconds=20.0, dtype=args.dtype)
    async with Engine(calibrate) as engine:
        if profile is None:
            profile = Path(f"/tmp/medha-mixed-cpu-profile-{args.dtype}.json")
            save_profile(engine.calibration.profile, profile)
        workload = build_mixed_workload(
            engine.tokenizer,
            long_tokens=args.long_tokens,
            num_shorts=args.shorts,
            short_rate=args.rate,
            seed=args.seed,
        )
    trace = trace_path("conv")
    print(
        f"workload: 1 long ({len(workload[0].prompt_ids) if workload[0].kind == 'long' else '?'} tokens) "
        f"+ {args.shorts} shorts at {args.rate}/s; medha in {args.dtype}, "
        f"{args.target_batch_time} s budget"
    )
    # Without the repository's traces beside the checkout, the shorts come from the bundled
    # sample: another workload, whose numbers do not compare with the committed ones.
    print(f"short lengths from {trace[0]}" + (" (the bundled sample)" if trace[1] else ""))
    policies = args.policies.split(",")
    shorts = [r for r in workload if r.kind == "short"]
    names = [f"medha {p}" for p in policies]
    if "lars" in policies:
        names.insert(names.index("medha lars") + 1, "medha lars, shorts only")
    if not args.skip_openvino:
        names.append("openvino-genai CB")
    runs: dict[str, list[Run]] = {name: [] for name in names}
    # Systems alternate within each round, so a slow spell of the shared machine falls on all
    # of them rather than on one system's runs.
    for round_index in range(args.repeats):
        for policy in policies:
            before = await medha_alone(policy, workload, args, profile)
            rows, wall = await medha_run(policy, workload, args, profile)
            after = await medha_alone(policy, workload, args, profile)
            runs[f"medha {policy}"].append(Run(rows, wall, before, after))
            if policy == "lars":
                # The floor: the same shorts with no document at all. What is left of their
                # slowdown is queueing behind each other, which no policy can remove; the gap
                # to this row is what the long request costs them.
                rows, wall = await medha_run(policy, shorts, args, profile)
                later = await medha_alone(policy, workload, args, profile)
                runs["medha lars, shorts only"].append(Run(rows, wall, after, later))
        if not args.skip_openvino:
            before = await openvino_alone(workload)
            rows, wall = await anyio.to_thread.run_sync(openvino_run, workload)
            after = await openvino_alone(workload)
            runs["openvino-genai CB"].append(Run(rows, wall, before, after))
        print(f"done: round {round_index + 1} of {args.repeats}", flush=True)
    table = {name: summarize(runs[name]) for name in runs}
    width = max(22, *(len(name) + 1 for name in table))
    header = (
        f"{'system':<{width}}{'slowdown p50':>13}{'p99':>8}{'short TTFT p50':>15}{'p99':>8}"
        f"{'long TTFT':>10}{'TPOT p50':>10}{'p99':>8}{'tok/s':>8}"
    )
    print(header)
    for name, s in table.items():
        print(
            f"{name:<{width}}{s['short_slowdown_p50']:>13.2f}{s['short_slowdown_p99']:>8.2f}"
            f"{s['short_ttft_p50']:>14.2f}s{s['short_ttft_p99']:>7.2f}s{_seconds(s['long_ttft']):>10}"
            f"{s['tpot_p50'] * 1000:>8.0f}ms{s['tpot_p99'] * 1000:>6.0f}ms{s['throughput_tok_s']:>8.1f}"
        )
    if "medha lars" in table and "medha fcfs" in table:
        ratio = (
            table["medha fcfs"]["short_slowdown_p99"] / table["medha lars"]["short_slowdown_p99"]
        )
        print(f"lars vs fcfs, short p99 slowdown: {ratio:.1f}x better")
    least = table[names[0]]["short_slowdown_p99_least_possible"]
    if least is not None:
        print(
            f"least possible short p99 slowdown: {least:.2f} (any schedule that runs one prefill "
            f"at a time at its alone speed, {names[0]}'s alone TTFTs; medha.bench.stretch_bound)"
        )
    if args.repeats > 1:
        print(
            "per run: short p99 slowdown | worst (least possible worst) | long TTFT | "
            "median alone TTFT (after/before)"
        )
        for name, s in table.items():
            p99s = " ".join(f"{v:.2f}" for v in s["short_slowdown_p99_per_run"])
            worsts = " ".join(
                f"{w:.2f} ({b:.2f})"
                for w, b in zip(
                    s["short_slowdown_worst_per_run"],
                    s["short_slowdown_least_worst_per_run"],
                    strict=True,
                )
            )
            longs = " ".join(_seconds(v) for v in s["long_ttft_per_run"])
            alones = " ".join(
                f"{v:.2f}s ({d:.2f})"
                for v, d in zip(
                    s["alone_ttft_median_per_run"], s["alone_drift_per_run"], strict=True
                )
            )
            print(f"  {name:<{width}}{p99s} | {worsts} | {longs} | {alones}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "setup": {**{k: str(v) for k, v in vars(args).items()}, "trace": str(trace[0])},
                "results": table,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policies",
        default="lars,fcfs,fcfs-chunked,lars-unpaused,lars-unguarded",
        help="medha systems, comma-separated: policy names, optionally with -unpaused and/or "
        "-unguarded, then +lone",
    )
    parser.add_argument("--long-tokens", type=int, default=6144)
    parser.add_argument("--shorts", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument(
        "--target-batch-time",
        type=float,
        default=None,
        help="medha's iteration budget; default 0.15 s in bf16, 0.25 s in fp32 (bf16 steps run "
        "~1.8x faster, so both give chunks of about the same size)",
    )
    parser.add_argument("--fixed-chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="play the workload this many times per system and pool the short requests",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="medha's weights, activations and KV cache (bf16: this CPU's avx512_bf16 matmuls)",
    )
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument(
        "--no-online-time-scale",
        action="store_true",
        help="keep medha's cost model at its calibrated level (EngineConfig.online_time_scale)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/mixed_cpu.json"))
    arguments = parser.parse_args()
    if arguments.target_batch_time is None:
        arguments.target_batch_time = 0.15 if arguments.dtype == "bfloat16" else 0.25
    anyio.run(main, arguments)
