"""`medha worker --engine HOST:PORT`: one worker of a multi-node engine, started by torchrun.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint NODE0:29400 \
        --no-python medha worker --engine ENGINE_HOST:29500

The engine (`ParallelConfig(attach="ENGINE_HOST:29500", ...)`) waits at that address; each
worker joins it as RANK of WORLD_SIZE, receives the model and layout from the engine, loads its
shard and serves steps until the engine stops it (or stops answering).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from medha.commands.arg_types import positive_float
from medha.commands.user_errors import UsageError


def host_port(text: str) -> str:
    """argparse type: HOST:PORT, the port a number in 1..65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return text


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="serve as one worker of an engine (started by torchrun; see docs/parallelism.md)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--engine", type=host_port, required=True, help="HOST:PORT the engine waits at")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="seconds to wait for the engine and peers (default 600)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in os.environ]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} not set; start `medha worker` with torchrun "
            "(see docs/parallelism.md)"
        )
    rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
        raise UsageError(f"RANK={rank!r} and WORLD_SIZE={world!r} are not a rank of a world")
    from medha.parallel.worker import serve_attached

    serve_attached(args.engine, args.timeout)
    return 0
