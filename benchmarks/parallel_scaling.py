"""What TP, SPP and KVP buy at 8 to 128 GPUs, in the simulator: one 1M-token prompt alone on
Llama-3-8B and H100s, its TTFT and its TPOT at 1M context, for each replica shape.

The simulator runs the same Scheduler as the engine (lars, adaptive chunks) against the cost
model (medha.perf) of the replica; numbers are predictions, not measurements.

    python benchmarks/parallel_scaling.py [--prompt 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medha.perf import H100_80GB, LLAMA_3_8B, ChunkBudget, ReplicaSpec
from medha.sim import Deployment, SimRequest, Simulator

OUTPUT_TOKENS = 64

# (name, tp, pp, kvp, spp)
SHAPES = [
    ("TP8", 8, 1, 1, True),
    ("TP8 x PP2, no SPP", 8, 2, 1, False),
    ("TP8 x SPP2", 8, 2, 1, True),
    ("TP8 x SPP4", 8, 4, 1, True),
    ("TP8 x SPP8", 8, 8, 1, True),
    ("TP8 x SPP4 x KVP2", 8, 4, 2, True),
    ("TP8 x SPP16", 8, 16, 1, True),
    ("TP8 x SPP8 x KVP2", 8, 8, 2, True),
    ("TP8 x SPP4 x KVP4", 8, 4, 4, True),
]


def run_shape(prompt: int, tp: int, pp: int, kvp: int, spp: bool) -> dict[str, Any]:
    per_group = -(-(prompt + OUTPUT_TOKENS) // kvp // 4096) * 4096 if kvp > 1 else None
    replica = ReplicaSpec(tp=tp, pp=pp, kvp=kvp, kvp_max_tokens_per_group=per_group)
    deployment = Deployment(LLAMA_3_8B, H100_80GB, replica)
    config = deployment.scheduler_config(policy="lars", target_batch_time=0.05, spp=spp)
    result = Simulator(config, deployment.cost_model(ChunkBudget.of(config))).run(
        [SimRequest("long", 0.0, prompt, OUTPUT_TOKENS, label="long")]
    )
    summary = result.summary("long")
    return dict(gpus=tp * pp * kvp, ttft_s=summary.ttft_p50, tpot_s=summary.tpot_p50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name, tp, pp, kvp, spp in SHAPES:
        rows.append(dict(shape=name, **run_shape(args.prompt, tp, pp, kvp, spp)))
    base = rows[0]
    print(f"Llama-3-8B, H100, one {args.prompt:,}-token prompt (simulated, lars)")
    print(f"{'replica':<20} {'GPUs':>5} {'TTFT':>9} {'speed-up':>9} {'TPOT':>9} {'speed-up':>9}")
    for row in rows:
        print(
            f"{row['shape']:<20} {row['gpus']:>5} {row['ttft_s']:>8.1f}s"
            f" {base['ttft_s'] / row['ttft_s']:>8.2f}x {row['tpot_s'] * 1e3:>7.1f}ms"
            f" {base['tpot_s'] / row['tpot_s']:>8.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
