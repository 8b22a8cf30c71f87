"""Drive a ModelRunner by hand in tests: allocate blocks, prefill in chunks, decode greedily."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from medha.model.kv_cache import KVCache
from medha.model.runner import ModelRunner, StepSeq
from tests.hf_models import hf_arch, medha_model

BLOCK_SIZE = 16


class ShuffledBlocks:
    """Hands out block ids in a scrambled order so block tables are never contiguous."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        assert len(taken) == n, "test ran out of KV blocks"
        return taken


def make_runner(variant: str, backend: str = "reference", num_blocks: int = 256) -> ModelRunner:
    arch = hf_arch(variant)
    return ModelRunner(medha_model(variant), KVCache(arch, num_blocks, BLOCK_SIZE), backend)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def prefill_in_chunks(
    runner: ModelRunner, ids: Sequence[int], chunks: Sequence[int], table: Sequence[int]
) -> torch.Tensor:
    """Run the prompt through in the given chunk sizes; logits of every prompt position."""
    assert sum(chunks) == len(ids)
    out, start = [], 0
    for size in chunks:
        step = StepSeq(ids[start : start + size], start, table)
        out.append(runner.step([step], all_logits=True))
        start += size
    return torch.cat(out)


def greedy_continue(
    runner: ModelRunner, first_token: int, length: int, table: Sequence[int], steps: int
) -> list[int]:
    """Decode `steps` tokens greedily after a prompt of `length` tokens whose next token is
    `first_token` (already chosen from the prefill's last logits)."""
    tokens = [first_token]
    while len(tokens) < steps:
        logits = runner.step([StepSeq([tokens[-1]], length + len(tokens) - 1, table)])
        tokens.append(int(logits[0].argmax()))
    return tokens
