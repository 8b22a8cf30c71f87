"""The "triton" attention backend: a mixed batch of prefill chunks and decodes over the paged KV
cache in at most two Triton launches (plus their merges), output and lse as every backend.

Prefill chunks go to `triton_prefill` (query tiles x kv heads, KV split only when that grid is
too small); decodes go to `triton_decode` (flash-decoding partitions). Each sequence belongs to
exactly one launch, so every output row is written once. The launch plans (tiles, splits, the
small index tensors on the device) are built once per step and reused by every layer.

Triton is imported only when the backend runs: `import medha` works without it. The backend is
preferred on CUDA. On CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1, set before
the kernels are first imported) and only when asked for by name: that is how the tests run it.

NOTE: no flash-attn adapter. flash-attn 2's paged path (`block_table`) needs a block size that is
a multiple of 256; medha's blocks are 16 tokens, and gathering the keys into contiguous memory
first would cost the bandwidth the kernel exists to save.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

import torch

from medha.kernels.attention import register_backend
from medha.kernels.metadata import AttentionMetadata

if TYPE_CHECKING:
    from medha.kernels.triton_prefill import LaunchPlan

REQUIREMENT = (
    "it needs the triton package (medha's gpu extra, docs/install.md) and a CUDA device; on "
    "CPU only Triton's interpreter runs it (TRITON_INTERPRET=1, for tests)"
)


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """TRITON_INTERPRET is set: Triton kernels imported from now on run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and triton_installed()


def triton_available_by_name(device: torch.device) -> bool:
    return triton_available(device) or (
        device.type == "cpu" and interpreting() and triton_installed()
    )


@cache
def _target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: a few per SM on a GPU; the interpreter
    runs programs one by one, so there splitting only costs time."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def triton_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    prefill_splits: int | None = None,
    decode_partitions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_attention`. `prefill_splits` / `decode_partitions` force the
    KV split of each launch (tests, benchmarks); by default it follows the device's size."""
    from medha.kernels.triton_prefill import launch

    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"triton attention needs q and the caches in one dtype (got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype})"
        )
    _check_shapes(q, k_cache, v_cache, meta)
    num_heads, head_dim = q.shape[1:]
    out, lse = new_outputs(q)
    heads = (num_heads, k_cache.shape[2], head_dim)
    plans = _plans(meta, heads, q.dtype, q.device, prefill_splits, decode_partitions)
    for plan in plans:
        launch(plan, q, k_cache, v_cache, meta.block_ids, scale, out, lse)
    return out, lse


def _check_shapes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    """What the kernels take on trust, checked once per call (a few integer compares): they
    index the pool with the cache's block size and read as many query rows and heads as the
    metadata and `q` say, so a mismatch reads out of bounds (a crash, or garbage) instead of
    failing."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k and v caches differ in shape: {k_cache.shape} vs {v_cache.shape}")
    if block_size != meta.block_size:
        raise ValueError(
            f"the caches' blocks hold {block_size} tokens, the metadata's {meta.block_size}"
        )
    if q.shape[0] != meta.num_tokens or q.shape[2] != head_dim or q.shape[1] % kv_heads:
        raise ValueError(
            f"q of shape {tuple(q.shape)} does not fit {meta.num_tokens} query tokens over "
            f"{kv_heads} kv heads of size {head_dim}"
        )


def new_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised out [T, Hq, D] and lse [T, Hq] (fp32): the kernels write every element
    (the tests poison these to prove it)."""
    out = torch.empty_like(q)
    return out, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)


def _plans(
    meta: AttentionMetadata,
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    prefill_splits: int | None,
    decode_partitions: int | None,
) -> Sequence[LaunchPlan]:
    """Launch plans of the step, built by the first layer and reused by the others."""
    key = f"triton_plans{heads}:{dtype}:{prefill_splits}:{decode_partitions}"
    cached: Sequence[LaunchPlan] | None = meta.scratch.get(key)
    if cached is not None:
        return cached
    from medha.kernels import triton_decode, triton_prefill

    num_heads, kv_heads, head_dim = heads
    group = num_heads // kv_heads
    chunks = [i for i, n in enumerate(meta.q_lens) if n > 1]
    decodes = [i for i, n in enumerate(meta.q_lens) if n == 1]
    kinds = [
        (
            chunks,
            triton_prefill.prefill_config(device, head_dim, dtype),
            triton_prefill.MIN_SPLIT_KEYS,
            prefill_splits,
        ),
        (
            decodes,
            triton_decode.decode_config(device, group, dtype),
            triton_decode.MIN_PARTITION_KEYS,
            decode_partitions,
        ),
    ]
    plans = [
        triton_prefill.plan_launch(
            meta,
            seqs,
            group=group,
            kv_heads=kv_heads,
            config=config,
            target_programs=_target_programs(device),
            min_split_keys=min_keys,
            num_splits=splits,
        )
        for seqs, config, min_keys, splits in kinds
        if seqs
    ]
    meta.scratch[key] = plans
    return plans


register_backend(
    "triton",
    triton_attention,
    triton_available,
    preferred=True,
    available_by_name=triton_available_by_name,
    requirement=REQUIREMENT,
)
