"""What one very long request costs the short ones batched with it, per step, on this CPU.

Medha's workload is a huge document beside many chats: every iteration then carries one
decode (or chunk) at a context of hundreds of thousands of tokens next to dozens of short
decodes. The long one's attention is its own cost; what the short ones must not pay for is the
step's bookkeeping growing with the longest context. Until December 2026 the attention
metadata padded every sequence's block table to the longest one, so 64 chats beside a
512K-token decode cost ~100 ms of host time per step to describe, over three times the
document's own decode (benchmarks/results/long_context_step.txt has the tables before and after
the fix).

Per context length: the step time of 64 short decodes alone, of the long decode alone, of both
in one step, and how long building the step's attention metadata takes for the joint step.
"together / (alone + alone)" near 1.0 means batching them costs nothing beyond their own work.
A tiny random-weight Llama (2 layers, 8 heads of 8 dims), fp32, sdpa backend, one thread:
only the attention over the long context and the bookkeeping grow with it.

    OMP_NUM_THREADS=1 python benchmarks/long_context_step.py [--contexts 65536,262144,524288]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.runner import ModelRunner, StepSeq, load_model

BLOCK = 16
SHORTS = 64
REPEATS = 5


def tiny_runner(num_blocks: int, max_len: int) -> ModelRunner:
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(0)
    weights = LlamaForCausalLM(config).state_dict()  # random: only the times count here
    arch = ModelArch.from_hf_config({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    model = load_model(arch, lambda name, dtype: weights[name].to(dtype), dtype=torch.float32)
    return ModelRunner(model, KVCache(arch, num_blocks, BLOCK, dtype=torch.float32), "sdpa")


def best_of(run: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="65536,262144,524288")
    args = parser.parse_args()
    torch.set_num_threads(1)
    contexts = [int(value) for value in args.contexts.split(",")]
    longest = max(contexts)
    runner = tiny_runner(longest // BLOCK + SHORTS + 8, longest + 1)
    long_blocks = list(range(longest // BLOCK + 1))
    shorts = [StepSeq([5], 10, [len(long_blocks) + i]) for i in range(SHORTS)]
    print(f"{'context':>8} {'shorts alone':>13} {'long alone':>11} {'together':>9} "
          f"{'ratio':>6} {'metadata':>9}")  # fmt: skip
    for context in contexts:
        long = StepSeq([5], context - 1, long_blocks[: context // BLOCK + 1])
        alone_shorts = best_of(lambda: runner.step(shorts))
        alone_long = best_of(lambda long=long: runner.step([long]))
        together = best_of(lambda long=long: runner.step([long, *shorts]))
        metadata = best_of(lambda long=long: runner.build_metadata([long, *shorts]))
        ratio = together / (alone_shorts + alone_long)
        print(
            f"{context:>8} {alone_shorts * 1e3:>10.1f} ms {alone_long * 1e3:>8.1f} ms "
            f"{together * 1e3:>6.1f} ms {ratio:>6.2f} {metadata * 1e3:>6.1f} ms"
        )


if __name__ == "__main__":
    main()
