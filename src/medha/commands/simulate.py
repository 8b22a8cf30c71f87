"""`medha simulate`: run scheduling policies on a simulated GPU deployment and compare them.

Example (the paper's Llama-3-8B setup, ShareGPT with 5% long requests):

    medha simulate --model llama-3-8b --hardware a100 --tp 8 --pp 2 \\
        --policy lars,fcfs,fcfs-chunked:512 --workload sharegpt --long-fraction 0.05 \\
        --qps 0.75 --num-requests 500 --json out.json --plot plots/
"""

from __future__ import annotations

import argparse
from typing import Any

from medha.commands.arg_types import fraction, output_path, positive_float, positive_int
from medha.commands.user_errors import (
    UsageError,
    check_output_file,
    prepare_output_dir,
    user_error_message,
)

DEFAULT_KVP_GROUP_TOKENS = 262_144
"""Tokens of one request per KVP group when --kvp > 1 and no --max-tokens-per-kvp-group."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="compare scheduling policies in the discrete-event simulator",
        description="Simulate serving a workload on TP x PP x KVP GPU replicas with the real "
        "scheduler and the roofline cost model; print TTFT/TPOT/E2E percentiles, throughput and "
        "deadline attainment per policy.",
    )
    p.add_argument("--model", default="llama-3-8b", choices=["llama-3-8b", "llama-3-70b"])
    p.add_argument("--hardware", default="h100", choices=["a100", "h100", "h200"])
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel degree (1)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--kvp", type=positive_int, default=1, help="KV-parallel groups (default 1)")
    p.add_argument("--no-spp", action="store_true", help="pipeline without stream pipelining")
    p.add_argument(
        "--max-tokens-per-kvp-group",
        type=positive_int,
        default=None,
        help=f"tokens of a request per KVP group (default {DEFAULT_KVP_GROUP_TOKENS} if kvp > 1)",
    )
    p.add_argument("--replicas", type=positive_int, default=1, help="replicas (default 1)")
    p.add_argument("--routing", default="round-robin", choices=["round-robin", "least-loaded"])
    p.add_argument(
        "--policy",
        default="lars",
        help="comma-separated policies: fcfs, fcfs-chunked[:CHUNK], edf, srpt, lrs, lars",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="CSV", help="requests from a CSV (see docs)")
    source.add_argument("--workload", choices=["sharegpt", "arxiv", "conv"], default=None)
    p.add_argument("--long-fraction", type=fraction, default=None, help="share of long requests")
    p.add_argument("--qps", type=positive_float, default=None, help="Poisson rate (default 1)")
    p.add_argument("--num-requests", type=positive_int, default=None, help="default 200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-batch-time", type=positive_float, default=0.05, help="seconds (0.05)")
    p.add_argument(
        "--fixed-chunk", type=positive_int, default=512, help="fcfs-chunked tokens (512)"
    )
    p.add_argument("--json", metavar="OUT", type=output_path, help="write the results as JSON")
    p.add_argument("--plot", metavar="DIR", type=output_path, help="write PNG plots (matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medha.perf import ReplicaSpec, device_profile, model_preset
    from medha.sim import HARDWARE_NAMES, Deployment
    from medha.sim.report import TABLE_WIDTH, print_results, results_json, write_json
    from medha.sim.runs import parse_policies, run_policies

    # Where the results go is checked before the simulation, not after it.
    if args.json:
        check_output_file(args.json)
    if args.plot:
        prepare_output_dir(args.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError(f"--plot needs matplotlib: {exc}") from exc
    try:
        # What these refuse is the command line's mistake (a policy, a layout, a workload).
        specs = parse_policies(args.policy)
        requests, workload = _requests(args)
        group_tokens = args.max_tokens_per_kvp_group
        if args.kvp > 1 and group_tokens is None:
            group_tokens = DEFAULT_KVP_GROUP_TOKENS
        deployment = Deployment(
            model_preset(args.model),
            device_profile(HARDWARE_NAMES[args.hardware]),
            ReplicaSpec(args.tp, args.pp, args.kvp, group_tokens if args.kvp > 1 else None),
            num_replicas=args.replicas,
        )
        deployment.cost_model()  # checks the layout: tp dividing the heads, pp the layers
        deployment.kv_tokens_per_group()  # and that the weights leave room for a KV cache
    except ValueError as exc:
        if user_error_message(exc) is not None:
            raise  # medha's own typed errors, and pydantic's: main prints them
        raise UsageError(str(exc)) from exc
    settings = {
        "target_batch_time": args.target_batch_time,
        "fixed_chunk": args.fixed_chunk,
        "spp": not args.no_spp,
    }
    runs = run_policies(
        deployment, specs, requests, scheduler_settings=settings, routing=args.routing
    )
    setup = {
        "model": args.model,
        **deployment.describe(),
        "spp": not args.no_spp,
        "routing": args.routing,
        "target_batch_time": args.target_batch_time,
        "fixed_chunk": args.fixed_chunk,
        **workload,
    }
    console = Console()
    if not console.is_terminal:
        console = Console(width=TABLE_WIDTH)
    title = (
        f"{args.model} on {deployment.num_gpus} x {args.hardware.upper()} "
        f"(TP{args.tp} x PP{args.pp}{'' if args.no_spp else ' SPP'} x KVP{args.kvp}"
        f"{f' x {args.replicas} replicas' if args.replicas > 1 else ''}), {workload['workload']}"
    )
    print_results(runs, title, console)
    for run in runs:
        for request_id, reason in list(run.result.rejected.items())[:3]:
            console.print(f"[yellow]{run.spec}: rejected {request_id}: {reason}[/yellow]")
    if args.json:
        console.print(f"wrote {write_json(args.json, results_json(setup, runs))}")
    if args.plot:
        from medha.sim.plots import write_plots

        for path in write_plots(runs, args.plot, title):
            console.print(f"wrote {path}")
    return 0


def _requests(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The request list and a description of it for the report."""
    from medha.sim import load_trace, read_requests_csv, synthetic_workload

    if args.trace:
        if args.qps is not None or args.long_fraction is not None:
            raise ValueError("--qps and --long-fraction apply to --workload, not to --trace")
        requests = read_requests_csv(args.trace)
        if args.num_requests is not None:
            requests = requests[: args.num_requests]
        return requests, {"workload": f"trace {args.trace}", "num_requests": len(requests)}
    name = args.workload or "sharegpt"
    qps = 1.0 if args.qps is None else args.qps
    long_fraction = args.long_fraction or 0.0
    num_requests = 200 if args.num_requests is None else args.num_requests
    trace = load_trace(name)
    requests = synthetic_workload(trace, num_requests, qps, args.seed, long_fraction)
    label = f"{name}{' (bundled sample)' if trace.is_sample else ''}"
    if long_fraction:
        label += f" + {long_fraction:.0%} long"
    return requests, {
        "workload": f"{label}, {qps:g} QPS",
        "trace_file": str(trace.source),
        "qps": qps,
        "long_fraction": long_fraction,
        "num_requests": num_requests,
        "seed": args.seed,
    }
