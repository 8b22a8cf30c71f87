"""Prefix caching: questions about one long document, with the cache and without, same run.

SmolLM2-135M-Instruct (fp32) on this machine's CPU through the engine: a DOC_TOKENS-token
document, then QUESTIONS questions about it, one after the other (a reader's session: each
question is the document plus its own tokens), and then the same session with a conversation
on top (each turn's prompt is the previous prompt, its answer and a new question). Each
setting runs alternately with `enable_prefix_caching` on and off, REPEATS times; per setting it
reports the first question's TTFT, the later questions' median TTFT and the ratio of the
latter without the cache to with it (the median over repeats, with its range), and checks that
both engines give the same tokens. Prints a table and writes JSON.

    python benchmarks/prefix_cache.py [--json benchmarks/results/prefix_cache.json]
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

import medha

DOC_TOKENS = 2000
QUESTIONS = 6
QUESTION_TOKENS = 40
ANSWER_TOKENS = 16
REPEATS = 3


def write_results(path: Path, summary: object, runs: object) -> None:
    """The workload's settings, the summary and every run, as JSON."""
    config = {
        "doc_tokens": DOC_TOKENS,
        "questions": QUESTIONS,
        "question_tokens": QUESTION_TOKENS,
        "answer_tokens": ANSWER_TOKENS,
        "repeats": REPEATS,
    }
    payload = {"config": config, "summary": summary, "runs": runs}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def random_tokens(seed: int, count: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(count)]


async def _session(engine: medha.Engine, conversation: bool) -> tuple[list[float], list[list[int]]]:
    vocab = engine._vocab_size
    document = random_tokens(0, DOC_TOKENS, vocab)
    params = medha.SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True)
    ttfts: list[float] = []
    answers: list[list[int]] = []
    prompt = list(document)
    for index in range(QUESTIONS):
        question = random_tokens(1 + index, QUESTION_TOKENS, vocab)
        prompt = [*prompt, *question] if conversation else [*document, *question]
        done = await engine.generate(prompt, params)
        assert done.metrics.ttft is not None
        ttfts.append(done.metrics.ttft)
        answers.append(done.token_ids)
        if conversation:
            prompt = [*prompt, *done.token_ids]
    return ttfts, answers


async def _run(caching: bool, conversation: bool) -> dict[str, object]:
    config = medha.EngineConfig(
        model="smollm2-135m", enable_prefix_caching=caching, kv_cache_gib=1.0
    )
    async with medha.Engine(config) as engine:
        started = time.perf_counter()
        ttfts, answers = await _session(engine, conversation)
        seconds = time.perf_counter() - started
        hits = engine.stats().prefix_cache_hit_tokens
    return {"ttfts": ttfts, "answers": answers, "seconds": seconds, "hit_tokens": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, object]]]] = {}
    for setting, conversation in (("questions", False), ("conversation", True)):
        runs: dict[str, list[dict[str, object]]] = {"cached": [], "uncached": []}
        for _ in range(REPEATS):
            for name, caching in (("uncached", False), ("cached", True)):
                runs[name].append(anyio.run(_run, caching, conversation))
            cached, uncached = runs["cached"][-1], runs["uncached"][-1]
            assert cached["answers"] == uncached["answers"], "the cache changed the tokens"
        results[setting] = runs

    print(
        f"{DOC_TOKENS}-token document, {QUESTIONS} questions of {QUESTION_TOKENS} tokens, "
        f"{ANSWER_TOKENS}-token answers; SmolLM2-135M fp32, {platform.machine()} CPU"
    )
    print(
        "| session | cache | first TTFT | later TTFT (median) | session time | tokens from cache |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    summary: dict[str, object] = {}
    for setting, runs in results.items():
        later: dict[str, list[float]] = {}
        for name, repeats in runs.items():
            firsts = [r["ttfts"][0] for r in repeats]  # type: ignore[index]
            later[name] = [statistics.median(r["ttfts"][1:]) for r in repeats]  # type: ignore[index]
            print(
                f"| {setting} | {name} | {statistics.median(firsts) * 1000:.0f} ms "
                f"| {statistics.median(later[name]) * 1000:.0f} ms "
                f"| {statistics.median(r['seconds'] for r in repeats):.1f} s "  # type: ignore[misc]
                f"| {repeats[-1]['hit_tokens']} |"
            )
        ratios = [u / c for u, c in zip(later["uncached"], later["cached"], strict=True)]
        summary[setting] = {
            "later_ttft_ratio_median": statistics.median(ratios),
            "later_ttft_ratio_range": [min(ratios), max(ratios)],
        }
        print(
            f"\n{setting}: later questions' TTFT {statistics.median(ratios):.1f}x lower with the "
            f"cache (range {min(ratios):.1f}-{max(ratios):.1f}x over {REPEATS} repeats); "
            "same tokens\n"
        )
    if args.json is not None:
        write_results(args.json, summary, results)


if __name__ == "__main__":
    main()
