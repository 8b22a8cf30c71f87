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


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker",
        help="serve as one worker of an engine (started by torchrun; see docs/parallelism.md)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--engine", required=True, help="HOST:PORT the engine waits at (its attach)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the engine and peers"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in os.environ]
    if missing:
        raise SystemExit(
            f"medha worker: {', '.join(missing)} not set; start it with torchrun "
            "(see docs/parallelism.md)"
        )
    from medha.parallel.worker import serve_attached

    serve_attached(args.engine, args.timeout)
    return 0
