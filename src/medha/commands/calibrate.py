"""`medha calibrate MODEL`: fit the cost model to this machine and save the device profile.

Times the real executor on a grid of batch shapes, fits the roofline model's coefficients, then
checks the fit on random mixed batches it was not fitted on and prints predicted vs measured.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from medha.commands.arg_types import doc_paragraph, output_path, positive_float, positive_int
from medha.commands.user_errors import UsageError, check_output_file


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit the cost model to this machine and save a device profile",
        description=doc_paragraph(__doc__, 1),
    )
    p.add_argument("model", help="a preset, an HF folder or a .gguf file")
    p.add_argument(
        "--out", type=output_path, default=None, help="profile path (default: cache dir)"
    )
    p.add_argument(
        "--seconds", type=positive_float, default=30.0, help="time budget of the grid (30)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-blocks", type=positive_int, default=1024)
    p.set_defaults(func=run)


def default_profile_path(model: str, device: str, dtype: str) -> Path:
    from medha.model.cache_dir import default_cache_dir

    return default_cache_dir() / "profiles" / f"{model_file_stem(model)}-{device}-{dtype}.json"


def model_file_stem(model: str) -> str:
    """The model's name as a file name, so that profiles of two models never share a file:
    for a folder or a file, its name and a hash of its absolute path (two checkpoints both
    called `model`)."""
    import hashlib

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name) or "model"
    path = Path(model).expanduser()
    if not path.exists():
        return name  # a preset's name
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{name}-{where}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medha.calibration import (
        MIN_CALIBRATION_TOKENS,
        calibrate_runner,
        mixed_validation_batches,
        prediction_errors,
    )
    from medha.model.setup import build_runner
    from medha.perf import RooflineCostModel, save_profile

    # Before minutes of timing, not after: a profile that cannot be saved is time lost.
    out = check_output_file(args.out or default_profile_path(args.model, args.device, args.dtype))
    console = Console()
    with console.status(f"loading {args.model}"):
        runner, _ = build_runner(
            args.model, num_blocks=args.num_blocks, dtype=args.dtype, device=args.device
        )
    if runner.kv_cache.capacity_tokens < MIN_CALIBRATION_TOKENS:
        raise UsageError(
            f"--num-blocks {args.num_blocks} holds {runner.kv_cache.capacity_tokens} tokens; "
            f"calibration needs at least {MIN_CALIBRATION_TOKENS} (--num-blocks "
            f"{-(-MIN_CALIBRATION_TOKENS // runner.block_size)})"
        )
    element = runner.kv_cache.k[0].element_size()
    with console.status(f"timing the executor for up to {args.seconds:.0f} s"):
        result, measurements = calibrate_runner(runner, budget_s=args.seconds, dtype_bytes=element)
    cost = RooflineCostModel(runner.arch, result.profile, dtype_bytes=element)
    with console.status("checking predictions on mixed batches"):
        pairs = prediction_errors(
            runner, cost, mixed_validation_batches(runner.kv_cache.num_blocks, runner.block_size)
        )
    errors = [abs(p - m) / m for p, m in pairs]
    try:
        save_profile(result.profile, out)
    except OSError as exc:  # the path was writable at start; the disk may be full by now
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    console.print(
        f"fitted on {len(measurements)} batch shapes: median error "
        f"{result.median_abs_rel_error:.1%}, max {result.max_abs_rel_error:.1%}"
    )
    console.print("mixed batches (not fitted on):  predicted    measured")
    for predicted, measured in pairs:
        console.print(f"{'':32}{predicted * 1000:8.1f} ms {measured * 1000:8.1f} ms")
    console.print(f"median absolute error on mixed batches: {statistics.median(errors):.1%}")
    console.print(f"profile saved to {out}; use it with EngineConfig(cost_profile=...)")
    return 0
