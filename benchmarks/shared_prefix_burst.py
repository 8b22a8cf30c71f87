"""Requests sent together with one long shared prefix: computed once, or once each.

SmolLM2-135M-Instruct (fp32) on this machine's CPU through the engine: QUESTIONS questions about
one DOC_TOKENS-token document, all sent at once (an agent's parallel calls over one document).
Three engines, alternating, REPEATS times:

- uncached: `enable_prefix_caching=False`; every question computes the document;
- cached, no waiting: prefix caching, but no request waits for a prefix another computes (an
  ablation: this script turns `SharedPrefixGate` off in its own process), so those admitted
  together each compute the document;
- cached: the default; one question computes the document, the others wait for it and take
  it from the cache.

Under two budgets: the default (target_batch_time 0.05 s; on this CPU the computing prompt's
chunk fills every iteration, so the others queue behind it whatever the gate does), and one
with room for more than that chunk (target_batch_time 0.5 s, max_chunk 64), as when a
prompt's chunk is capped below what the budget fits (max_chunk, or a long prefill's space
sharing).

Reports the median and the last TTFT, the session's time and the tokens taken from the cache,
checks that all engines give the same tokens, and writes JSON.

    python benchmarks/shared_prefix_burst.py [--json benchmarks/results/shared_prefix_burst.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import anyio
from prefix_cache import (  # the same document, questions and answers (this directory)
    ANSWER_TOKENS,
    DOC_TOKENS,
    QUESTION_TOKENS,
    QUESTIONS,
    REPEATS,
    random_tokens,
    write_results,
)

import medha
from medha.scheduler import prefix_sharing

VARIANTS = ("uncached", "cached, no waiting", "cached")
BUDGETS: dict[str, dict[str, float]] = {
    "default budget": {},
    "room for two chunks": {"target_batch_time": 0.5, "max_chunk": 64},
}


async def _burst(engine: medha.Engine) -> tuple[list[float], list[list[int]]]:
    vocab = engine._vocab_size
    document = random_tokens(0, DOC_TOKENS, vocab)
    params = medha.SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True)
    ttfts = [0.0] * QUESTIONS
    answers: list[list[int]] = [[] for _ in range(QUESTIONS)]

    async def ask(index: int) -> None:
        prompt = [*document, *random_tokens(1 + index, QUESTION_TOKENS, vocab)]
        done = await engine.generate(prompt, params)
        assert done.metrics.ttft is not None
        ttfts[index], answers[index] = done.metrics.ttft, done.token_ids

    async with anyio.create_task_group() as group:
        for index in range(QUESTIONS):
            group.start_soon(ask, index)
    return ttfts, answers


async def _run(variant: str, budget: dict[str, float]) -> dict[str, object]:
    config = medha.EngineConfig(
        model="smollm2-135m",
        enable_prefix_caching=variant != "uncached",
        kv_cache_gib=1.0,
        **budget,
    )
    computer_of = prefix_sharing.SharedPrefixGate.computer_of
    if variant == "cached, no waiting":
        gate = prefix_sharing.SharedPrefixGate
        gate.computer_of = lambda self, request: None  # type: ignore[method-assign]
    try:
        async with medha.Engine(config) as engine:
            started = time.perf_counter()
            ttfts, answers = await _burst(engine)
            seconds = time.perf_counter() - started
            hits = engine.stats().prefix_cache_hit_tokens
    finally:
        prefix_sharing.SharedPrefixGate.computer_of = computer_of  # type: ignore[method-assign]
    return {"ttfts": ttfts, "answers": answers, "seconds": seconds, "hit_tokens": hits}


def _report(budget: str, runs: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    medians: dict[str, list[float]] = {}
    for variant, repeats in runs.items():
        ttfts = [r["ttfts"] for r in repeats]
        medians[variant] = [statistics.median(t) for t in ttfts]  # type: ignore[arg-type]
        lasts = [max(r["ttfts"]) for r in repeats]  # type: ignore[type-var]
        seconds = [r["seconds"] for r in repeats]
        print(
            f"| {budget} | {variant} | {statistics.median(medians[variant]):.2f} s "
            f"| {statistics.median(lasts):.2f} s "  # type: ignore[type-var]
            f"| {statistics.median(seconds):.1f} s "  # type: ignore[type-var]
            f"| {repeats[-1]['hit_tokens']} |"
        )
    summary = {}
    for baseline in ("uncached", "cached, no waiting"):
        ratios = [b / c for b, c in zip(medians[baseline], medians["cached"], strict=True)]
        summary[baseline] = {
            "median": statistics.median(ratios),
            "range": [min(ratios), max(ratios)],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, object]]]] = {}
    for budget, settings in BUDGETS.items():
        runs: dict[str, list[dict[str, object]]] = {variant: [] for variant in VARIANTS}
        for _ in range(REPEATS):
            for variant in VARIANTS:
                runs[variant].append(anyio.run(_run, variant, settings))
            answers = [runs[variant][-1]["answers"] for variant in VARIANTS]
            assert all(a == answers[0] for a in answers), "the variants gave different tokens"
        results[budget] = runs
    print(
        f"{QUESTIONS} questions of {QUESTION_TOKENS} tokens about one {DOC_TOKENS}-token "
        f"document, sent at once; {ANSWER_TOKENS}-token answers; SmolLM2-135M fp32, "
        f"{platform.machine()} CPU; medians over {REPEATS} repeats; same tokens from every engine"
    )
    print("| budget | engine | median TTFT | last TTFT | session time | tokens from cache |")
    print("| --- | --- | --- | --- | --- | --- |")
    summary = {budget: _report(budget, runs) for budget, runs in results.items()}
    for budget, ratios in summary.items():
        for baseline, ratio in ratios.items():  # type: ignore[attr-defined]
            low, high = ratio["range"]
            print(
                f"{budget}: median TTFT {ratio['median']:.1f}x lower than {baseline} "
                f"(range {low:.1f}-{high:.1f}x)"
            )
    if args.json is not None:
        write_results(args.json, summary, results)


if __name__ == "__main__":
    main()
