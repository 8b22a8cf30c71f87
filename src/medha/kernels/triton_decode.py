"""Flash-decoding over a paged KV cache: decode tokens (one query per sequence) with the keys
split into partitions.

A decode is memory bound: it reads every cached key and value once and does little arithmetic
with them. With one program per (sequence, kv head) a batch of 1 at long context would keep only
Hkv programs busy, a few percent of an H100's SMs. So the keys are cut into partitions, one
program each, that stream K/V at full bandwidth and write a partial (output, lse); a reduction
kernel (`medha.kernels.triton_merge`) then merges the partitions exactly.

The per-partition kernel is `medha.kernels.triton_prefill.paged_attention_kernel` with one token
per tile: the group of query heads sharing a kv head form the tile's rows (padded to 16 for the
tensor-core dot), so each K/V tile is read once for all of them. `triton_backend` plans the
launch (`triton_prefill.plan_launch`) with the tile shape and partition length defined here.
"""

from __future__ import annotations

import torch
import triton

from medha.kernels.triton_prefill import TileConfig

# A partition shorter than this costs more in its partial's write and merge than it gains in
# parallelism.
MIN_PARTITION_KEYS = 1024


def decode_config(device: torch.device, group: int, dtype: torch.dtype) -> TileConfig:
    """One token's group of query heads per tile, padded to the 16 rows a tensor-core dot needs."""
    block_m = max(16, triton.next_power_of_2(group))
    if device.type != "cuda":
        return TileConfig(block_m=block_m, block_n=16)
    stages = 2 if dtype == torch.float32 else 3  # fp32 tiles take twice the shared memory
    return TileConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=stages)
