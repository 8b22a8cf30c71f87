"""`medha demo`: one long document and a stream of short chats on SmolLM2-135M, under LARS and
then under FCFS, with a comparison table and plots."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from medha.commands.arg_types import policy_list, positive_float, positive_int
from medha.commands.calibrate import model_file_stem
from medha.commands.user_errors import UsageError, prepare_output_dir


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="LARS vs FCFS on a long document mixed with short chats",
        description="Run a long document request among Poisson-arriving short chat requests, "
        "under each policy in turn, and compare short-request latency.",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--policies",
        type=policy_list,
        default="lars,fcfs",
        help="comma-separated, run in turn (default lars,fcfs)",
    )
    p.add_argument("--long-tokens", type=positive_int, default=6144)
    p.add_argument("--shorts", type=positive_int, default=20, help="number of short requests")
    p.add_argument("--rate", type=positive_float, default=0.5, help="short requests per second")
    p.add_argument(
        "--target-batch-time",
        type=positive_float,
        default=None,
        help="iteration budget; default 0.25 s in fp32, 0.15 s in bf16 (chunks of about the "
        "same size: a bf16 step runs ~1.5-2x faster)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: ~1.5-2x faster steps on CPUs with AVX-512 BF16 (docs/engine.md#precision)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_run, args)


async def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from medha.bench.engine_run import iteration_time_error, run_workload, summarize
    from medha.bench.mixed_workload import build_mixed_workload
    from medha.config import EngineConfig
    from medha.engine import Engine
    from medha.perf import save_profile
    from medha.sim.traces import trace_path

    console = Console()
    if args.target_batch_time is None:
        args.target_batch_time = 0.15 if args.dtype == "bfloat16" else 0.25
    prepare_output_dir(args.out)
    profile_path = args.out / f"cpu-profile-{model_file_stem(args.model)}-{args.dtype}.json"
    policies: list[str] = args.policies
    summaries: dict[str, dict[str, float]] = {}
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    workload = None
    for policy in policies:
        config = EngineConfig(
            model=args.model,
            policy=policy,
            target_batch_time=args.target_batch_time,
            cost_profile=profile_path if _readable_profile(profile_path) else None,
            calibration_seconds=6.0,
            dtype=args.dtype,
        )
        with console.status(f"[bold]{policy}[/]: loading {args.model} and calibrating"):
            engine = Engine(config, record_iterations=True)
            await engine.start()
        try:
            if engine.calibration is not None:
                try:
                    save_profile(engine.calibration.profile, profile_path)
                except OSError as exc:  # the folder was writable at start; the disk may be full
                    raise UsageError(f"cannot write {profile_path}: {exc.strerror or exc}") from exc
            if workload is None:
                workload = build_mixed_workload(
                    engine.tokenizer,
                    long_tokens=args.long_tokens,
                    num_shorts=args.shorts,
                    short_rate=args.rate,
                    seed=args.seed,
                )
                _check_fits(workload, engine.max_model_len)
                trace, is_sample = trace_path("conv")
                sample = " (the bundled sample: shared/data/traces is not beside this checkout)"
                console.print(
                    f"short-request lengths from {trace.name}{sample if is_sample else ''}"
                )
            columns = (
                TextColumn(f"[bold]{policy}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("requests"),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(policy, total=len(workload))
                started = time.perf_counter()
                rows = await run_workload(
                    engine, workload, on_done=lambda _, task=task: progress.advance(task)
                )
                wall = time.perf_counter() - started
            results[policy] = rows
            summaries[policy] = summarize(rows, wall)
            histories[policy] = list(engine.iteration_history)
            summaries[policy]["iteration_error"] = iteration_time_error(histories[policy])
        finally:
            await engine.stop()

    table = Table(
        title=f"{args.model}: one {args.long_tokens}-token document + "
        f"{args.shorts} short chats ({args.rate}/s)"
    )
    table.add_column("policy")
    for name in (
        "short TTFT p50",
        "short TTFT p99",
        "long TTFT",
        "TPOT p50",
        "TPOT p99",
        "tok/s",
        "iter. time error",
    ):
        table.add_column(name, justify="right")
    for policy, s in summaries.items():
        table.add_row(
            policy,
            _s(s["short_ttft_p50"]),
            _s(s["short_ttft_p99"]),
            _s(s["long_ttft"]),
            _ms(s["tpot_p50"]),
            _ms(s["tpot_p99"]),
            f"{s['throughput_tok_s']:.1f}",
            f"{s['iteration_error']:.0%}",
        )
    console.print(table)
    console.print(
        "iter. time error: median |predicted - measured| / measured iteration time, i.e. how "
        "well the cost model the scheduler plans with (calibrated at start, its level then "
        "tracked online) follows this machine"
    )
    if "lars" in summaries and "fcfs" in summaries:
        fcfs, lars = summaries["fcfs"]["short_ttft_p99"], summaries["lars"]["short_ttft_p99"]
        console.print(f"short-request p99 TTFT: {lars_against_fcfs(lars, fcfs)}")
    try:
        from medha.bench.plots import plot_timeline, plot_ttft_cdf
    except RuntimeError as exc:
        console.print(f"[yellow]no plots: {exc}[/]")
        return 0
    assert workload is not None
    long_ids = {r.request_id for r in workload if r.kind == "long"}
    try:
        timeline = plot_timeline(histories, args.out / "timeline.png", long_ids)
        cdf = plot_ttft_cdf(results, args.out / "ttft_cdf.png")
    except RuntimeError as exc:
        console.print(f"[yellow]no plots: {exc}[/]")
        return 0
    console.print(f"plots: {timeline}, {cdf}")
    return 0


def _s(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f} s"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f} ms"


def lars_against_fcfs(lars: float, fcfs: float) -> str:
    """How LARS's short-request p99 TTFT compares with FCFS's, as a ratio above 1."""
    if lars <= fcfs:
        return f"lars is {fcfs / lars:.1f}x lower than fcfs"
    return f"lars is {lars / fcfs:.1f}x higher than fcfs"


def _readable_profile(path: Path) -> bool:
    """Whether the profile an earlier run saved can be used (a truncated or hand-edited one is
    calibrated again, and overwritten)."""
    from medha.perf import load_profile

    try:
        load_profile(path)
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return False
    return True


def _check_fits(workload: list[Any], max_model_len: int) -> None:
    """UsageError if a request (the document, with its chat template) is longer than the
    model's context: before the runs, not as their task group's error."""
    for request in workload:
        if len(request.prompt_ids) + request.max_tokens > max_model_len:
            raise UsageError(
                f"the {request.kind} request's prompt ({len(request.prompt_ids)} tokens) and "
                f"output ({request.max_tokens}) exceed the model's context of {max_model_len} "
                "tokens: lower --long-tokens"
            )
