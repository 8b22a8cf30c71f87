"""Attention kernels over a paged KV cache, each returning (output, log-sum-exp), and the exact
merge of partials that KV parallelism needs.
"""

from __future__ import annotations

from medha.kernels.attention import (
    AttentionFn,
    backend_names,
    paged_attention,
    register_backend,
    select_backend,
    write_kv,
)
from medha.kernels.merge import merge_attention_partials
from medha.kernels.metadata import AttentionMetadata
from medha.kernels.triton_backend import triton_attention  # registers "triton"; imports no triton

__all__ = [
    "AttentionFn",
    "AttentionMetadata",
    "backend_names",
    "merge_attention_partials",
    "paged_attention",
    "register_backend",
    "select_backend",
    "triton_attention",
    "write_kv",
]
