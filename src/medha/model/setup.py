"""From a model name to a ready ModelRunner and its tokenizer (one request at a time)."""

from __future__ import annotations

import torch

from medha.model.kv_cache import KVCache
from medha.model.loader import load_checkpoint
from medha.model.runner import ModelRunner, load_model
from medha.model.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def build_runner(
    model: str,
    *,
    max_tokens: int | None = None,
    num_blocks: int | None = None,
    block_size: int = 16,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attention_backend: str = "auto",
) -> tuple[ModelRunner, Tokenizer]:
    """Load `model` and give it a KV cache of `num_blocks`, by default enough for the model's
    whole context (plus `max_tokens`, for models whose config undersells their context)."""
    checkpoint = load_checkpoint(model)
    torch_dtype = resolve_dtype(dtype)
    net = load_model(checkpoint.arch, checkpoint.get_tensor, torch_dtype, device)
    if num_blocks is None:
        tokens = checkpoint.arch.max_position_embeddings + (max_tokens or 0)
        num_blocks = -(-tokens // block_size)
    cache = KVCache(checkpoint.arch, num_blocks, block_size, torch_dtype, device)
    return ModelRunner(net, cache, attention_backend), checkpoint.tokenizer
