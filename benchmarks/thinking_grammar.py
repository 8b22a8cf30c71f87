"""What a structured output costs per token when the model may think first
(StructuredOutputsParams.thinking), against the same constraint without thinking, same run.

SmolLM2-135M-Instruct's tokenizer (49K tokens), as a GrammarCompiler of the engine builds it:
once as it is (its `<think>` is text, several tokens), once with `<think>` and `</think>`
added as tokens of their own (as Qwen 3's and DeepSeek-R1's vocabularies have them). For each,
a fixed thought (THOUGHT, ~200 tokens) and a JSON answer under SCHEMA are replayed through a
matcher: per token, the mask for the next step plus accepting the token, as the scheduler actor
does on the event loop. Reports p50/p99 microseconds per token while thinking and while
answering, and for the answer alone with no thinking; then the first compile of each grammar.

    python benchmarks/thinking_grammar.py [--json benchmarks/results/thinking_grammar.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from medha import StructuredOutputsParams, Thinking
from medha.grammar import GrammarCompiler
from medha.model.loader import load_hf_folder
from medha.model.presets import materialize_preset
from medha.model.tokenizer import Tokenizer

MODEL = "smollm2-135m"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
THOUGHT = (
    "The user wants the weather in Paris for the next 3 days. The format is a JSON object: "
    "city is a string, days an integer. So the city is Paris, and days is 3. Let me check "
    "that nothing else is asked: no, only those two fields, in that order. "
) * 4
ANSWER = '{"city": "Paris", "days": 3}'
REPEATS = 5


def replay(
    compiler: GrammarCompiler, params: StructuredOutputsParams, ids: list[int]
) -> list[float]:
    """Microseconds of mask + accept for each token of `ids`."""
    matcher = compiler.matcher(params)
    costs = []
    for token in ids:
        start = time.perf_counter()
        matcher.next_mask()
        matcher.accept(token)
        costs.append(1e6 * (time.perf_counter() - start))
    assert matcher.complete, "the replayed output completes the grammar"
    return costs


def measure(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    compiler = GrammarCompiler(tokenizer, vocab_size)
    compiler._llguidance_tokenizer()  # built once per engine; not what is measured here
    plain = StructuredOutputsParams(json=SCHEMA)
    thinking = StructuredOutputsParams(json=SCHEMA, thinking=Thinking())
    compile_s = {}
    for name, params in (("alone", plain), ("after thinking", thinking)):
        start = time.perf_counter()
        compiler.matcher(params)
        compile_s[name] = time.perf_counter() - start
    encode = tokenizer.encode
    thought = encode(f"<think>{THOUGHT}</think>", add_special_tokens=False)
    answer = encode(ANSWER, add_special_tokens=False)
    runs: dict[str, list[float]] = {"answer alone": [], "thinking": [], "answer after thinking": []}
    for _ in range(REPEATS):
        runs["answer alone"] += replay(compiler, plain, answer)
        both = replay(compiler, thinking, thought + answer)
        runs["thinking"] += both[: len(thought)]
        runs["answer after thinking"] += both[len(thought) :]
    return {
        "thought_tokens": len(thought),
        "answer_tokens": len(answer),
        "us_per_token": {
            name: {"p50": statistics.median(c), "p99": sorted(c)[int(0.99 * (len(c) - 1))]}
            for name, c in runs.items()
        },
        "first_compile_ms": {name: 1000 * s for name, s in compile_s.items()},
    }


def tokenizers() -> dict[str, tuple[Tokenizer, int]]:
    from transformers import PreTrainedTokenizerFast

    folder = materialize_preset(MODEL)
    loaded = load_hf_folder(folder)
    vocab = loaded.arch.vocab_size
    with_tags = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    with_tags.add_tokens(["<think>", "</think>"])
    eos = loaded.tokenizer.eos_token_ids
    added = Tokenizer(with_tags, folder=folder, config_eos_token_ids=eos)
    return {
        "text tags": (loaded.tokenizer, vocab),
        "token tags": (added, max(vocab, len(with_tags))),
    }


def main(json_path: Path | None) -> None:
    results = {name: measure(*made) for name, made in tokenizers().items()}
    print(f"{MODEL}'s tokenizer, JSON schema answer, mask + accept per token, {REPEATS} replays")
    print(f"{'tags':<11}{'part':<23}{'tokens':>7}{'p50 us':>9}{'p99 us':>9}")
    for name, result in results.items():
        for part, cost in result["us_per_token"].items():
            count = result["thought_tokens"] if part == "thinking" else result["answer_tokens"]
            print(f"{name:<11}{part:<23}{count:>7}{cost['p50']:>9.1f}{cost['p99']:>9.1f}")
        compiled = result["first_compile_ms"]
        print(
            f"{'':<11}first compile: {compiled['alone']:.1f} ms alone, "
            f"{compiled['after thinking']:.1f} ms after thinking"
        )
    if json_path is not None:
        payload = {"model": MODEL, "machine": platform.processor() or platform.machine()}
        payload["results"] = results
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    main(parser.parse_args().json)
