"""Multi-process parallelism on this CPU: what SPP does to a long prompt's TTFT and KVP to TPOT at
long context, measured through the Engine, next to the cost model's predictions.

- TTFT of one long prompt: pp=1 (one process) vs pp=2 without SPP vs pp=2 with SPP. Chunks are
  fixed (fcfs-chunked) so every run prefills the same chunks.
- TPOT of greedy decoding after a long prompt: kvp=1 vs kvp=2 (the KV split half and half).
- A burst of short requests (all sent at once): how long until the last one is done, kvp=1 vs
  kvp=2. Each short request lives on one KVP group, so the groups serve them side by side.

Every process runs ONE torch thread, so pp=2 and kvp=2 use two cores where the one-process
baseline uses one: the question is how much of a second device each mechanism turns into speed.
The model is random-weight, no GQA (KV reads weigh as much as possible), sized so that one
2-core machine finishes in a few minutes. Predictions come from the RooflineCostModel of each
replica shape with a profile calibrated here (one thread), fed the chunks the engine actually
ran (TTFT) or the decode shapes (TPOT).

    python benchmarks/parallel_cpu.py [--prompt 3072] [--context 6144] [--burst 16]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import medha
from medha import SamplingParams

MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 65536,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
CHUNK = 256
DECODE_TOKENS = 24
SHORT_PROMPT = 200
SHORT_OUTPUT = 32


def build_model(folder: Path) -> Path:
    from medha.model.presets import write_random_checkpoint

    if not (folder / "config.json").exists():
        write_random_checkpoint(folder, MODEL_CONFIG, seed=11)
    return folder


def calibrate(model: Path, out: Path) -> Path:
    from medha.calibration import calibrate_runner
    from medha.model.setup import build_runner
    from medha.perf import save_profile

    runner, _ = build_runner(str(model), num_blocks=1024)
    result, _ = calibrate_runner(runner, budget_s=8.0)
    save_profile(result.profile, out)
    return out


def engine_config(model: Path, profile: Path, parallel: medha.ParallelConfig, **kw: Any) -> Any:
    settings: dict[str, Any] = dict(
        model=str(model),
        cost_profile=profile,
        num_blocks=1024,
        policy="fcfs-chunked",
        fixed_chunk=CHUNK,
        parallel=parallel,
        # Every measurement repeats its prompts: each run must compute them again.
        enable_prefix_caching=False,
    )
    settings.update(kw)
    return medha.EngineConfig(**settings)


async def run_request(
    config: Any, prompt: list[int], max_tokens: int, repeats: int
) -> tuple[Any, float, float, Any, Any]:
    """Run `prompt` alone `repeats` times after a warm-up: (last completion, median TTFT, median
    TPOT, the last run's iteration history, cost model). Medians: this 2-core machine is noisy."""
    async with medha.Engine(config, record_iterations=True) as engine:
        warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        await engine.generate(prompt[:64], warm)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ttfts, tpots = [], []
        for _ in range(repeats):
            skip = len(engine.iteration_history)
            done = await engine.generate(prompt, params)
            ttfts.append(done.metrics.ttft)
            tpots.append(done.metrics.tpot or 0.0)
        history = engine.iteration_history[skip:]
        cost = engine._scheduler_actor.scheduler.cost  # type: ignore[union-attr]
    return done, statistics.median(ttfts), statistics.median(tpots), history, cost


async def run_burst(
    config: Any, prompts: list[list[int]], max_tokens: int, repeats: int
) -> tuple[list[list[int]], float, float]:
    """Send every prompt at once, `repeats` times after a warm-up: (the outputs, median time
    until the last one finished, the cost model's time for the iterations of that run: the sum
    of their predictions, one plan at a time without a pipeline)."""
    async with medha.Engine(config, record_iterations=True) as engine:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        await engine.generate(prompts[0], params)
        spans, predictions = [], []
        done: list[Any] = [None] * len(prompts)

        async def one(i: int) -> None:
            done[i] = await engine.generate(prompts[i], params)

        for _ in range(repeats):
            skip = len(engine.iteration_history)
            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for i in range(len(prompts)):
                    group.start_soon(one, i)
            spans.append(time.perf_counter() - started)
            history = engine.iteration_history[skip:]
            predictions.append(sum(record.predicted_seconds for record in history))
    outputs = [completion.token_ids for completion in done]
    return outputs, statistics.median(spans), statistics.median(predictions)


def predicted_ttft(cost: Any, history: list[Any], spp: bool) -> float:
    """The cost model's TTFT for the chunks the engine ran: with SPP chunks stream through the
    stages (sum of stage times plus the last drain), without it each waits for the previous."""
    from medha.scheduler import SeqShape

    chunks, start = [], 0
    for record in history:
        for _, tokens, is_prefill in record.tokens:
            if is_prefill:
                chunks.append(SeqShape(tokens, start))
                start += tokens
    if not spp:
        return sum(cost.batch_time([c]) for c in chunks)
    stage = [cost.stage_time([c]) for c in chunks]
    drain = max(cost.batch_time([c]) - s for c, s in zip(chunks, stage, strict=True))
    return sum(stage) + drain


def predicted_tpot(cost: Any, context: int, kvp_tokens: int | None) -> float:
    """The cost model's time per decode step: its slowest KVP group's (a full shard's, or the
    appending group's)."""
    from medha.scheduler import SeqShape
    from medha.scheduler.kvp import shard_sizes

    times = []
    for position in range(context, context + DECODE_TOKENS - 1):
        groups = 1 if kvp_tokens is None else position // kvp_tokens + 1
        shards = shard_sizes(position, groups, kvp_tokens)
        times.append(max(cost.batch_time([SeqShape(1, kv, groups)]) for kv in shards))
    return statistics.fmean(times)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # the one-process baseline gets one core, like each worker
    root = Path(args.cache or tempfile.mkdtemp(prefix="medha-parallel-bench-"))
    model = build_model(root / "model")
    profile = root / "cpu-profile.json"
    if not profile.exists():
        calibrate(model, profile)
    rows: list[dict[str, Any]] = []
    prompt = [(7 * i + 3) % MODEL_CONFIG["vocab_size"] for i in range(args.prompt)]
    reference = None
    for name, parallel, spp in (
        ("pp=1", medha.ParallelConfig(), False),
        ("pp=2, no SPP", medha.ParallelConfig(pp=2, spp=False), False),
        ("pp=2, SPP", medha.ParallelConfig(pp=2, spp=True), True),
    ):
        started = time.perf_counter()
        config = engine_config(model, profile, parallel)
        done, ttft, _, history, cost = await run_request(config, prompt, 1, args.repeats)
        reference = reference or done.token_ids
        assert done.token_ids == reference, f"{name}: tokens differ from pp=1"
        rows.append(
            dict(
                metric=f"TTFT, {args.prompt}-token prompt",
                config=name,
                measured_s=ttft,
                predicted_s=predicted_ttft(cost, history, spp),
                wall_s=time.perf_counter() - started,
            )
        )
    context = [(11 * i + 5) % MODEL_CONFIG["vocab_size"] for i in range(args.context)]
    half = -(-(args.context + DECODE_TOKENS) // 2 // 16) * 16
    reference = None
    for name, parallel in (
        ("kvp=1", medha.ParallelConfig()),
        ("kvp=2", medha.ParallelConfig(kvp=2, max_tokens_per_kvp_group=half)),
    ):
        started = time.perf_counter()
        config = engine_config(model, profile, parallel, fixed_chunk=1024)
        done, _, tpot, _, cost = await run_request(config, context, DECODE_TOKENS, args.repeats)
        reference = reference or done.token_ids
        assert done.token_ids == reference, f"{name}: tokens differ from kvp=1"
        kvp_tokens = parallel.max_tokens_per_kvp_group
        rows.append(
            dict(
                metric=f"TPOT at {args.context} tokens",
                config=name,
                measured_s=tpot,
                predicted_s=predicted_tpot(cost, args.context, kvp_tokens),
                wall_s=time.perf_counter() - started,
            )
        )
    prompts = [
        [(13 * i + 7 * n) % MODEL_CONFIG["vocab_size"] for i in range(SHORT_PROMPT)]
        for n in range(args.burst)
    ]
    reference = None
    for name, parallel in (
        ("kvp=1", medha.ParallelConfig()),
        ("kvp=2", medha.ParallelConfig(kvp=2, max_tokens_per_kvp_group=4096)),
    ):
        started = time.perf_counter()
        config = engine_config(model, profile, parallel, policy="lars")
        outputs, span, predicted = await run_burst(config, prompts, SHORT_OUTPUT, args.repeats)
        reference = reference or outputs
        assert outputs == reference, f"{name}: tokens differ from kvp=1"
        rows.append(
            dict(
                metric=f"{args.burst} short requests",
                config=name,
                measured_s=span,
                predicted_s=predicted,
                wall_s=time.perf_counter() - started,
            )
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'metric':<28} {'config':<14} {'measured':>10} {'predicted':>10} {'speed-up':>9}")
    base: dict[str, float] = {}
    for row in rows:
        base.setdefault(row["metric"], row["measured_s"])
        speedup = base[row["metric"]] / row["measured_s"]
        print(
            f"{row['metric']:<28} {row['config']:<14} {row['measured_s'] * 1e3:>8.1f}ms"
            f" {row['predicted_s'] * 1e3:>8.1f}ms {speedup:>8.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3072, help="TTFT prompt tokens")
    parser.add_argument("--context", type=int, default=6144, help="TPOT context tokens")
    parser.add_argument("--burst", type=int, default=16, help="short requests sent at once")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--cache", help="folder to keep the model and profile between runs")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = anyio.run(main_async, args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
