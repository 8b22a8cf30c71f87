"""Per-sequence views of a paged KV cache, shared by the torch attention backends.

Everything here is computed once per step (not per layer) and cached in the metadata's
scratch, because every layer of a step reads the same blocks with the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from medha.kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class SeqView:
    """Where one sequence's queries and keys are, and which keys each query may see."""

    q_slice: slice
    block_ids: torch.Tensor
    """int64 [num_blocks] covering the sequence's keys in this shard."""
    kv_len: int
    q_start: int
    """Absolute position of the first query."""
    kv_start: int
    """Absolute position of the first key in this shard."""
    all_visible: bool
    """Every query sees every key (a decode; a KVP shard wholly before the queries)."""
    causal_tail: bool
    """The queries are the shard's last q_len keys (a prefill chunk, or a decode, appending to
    this shard): attention = full over the prefix + causal over the chunk itself."""
    first_block: int | None = None
    """The first block id when the blocks are consecutive ids: the keys are then read in place,
    without a gather."""

    @cached_property
    def visible(self) -> torch.Tensor | None:
        """bool [q_len, kv_len]: which keys each query sees; None when it sees all of them.
        Built on first use (then kept for the step's other layers), since a prefill chunk's is
        q_len x kv_len: 2 GiB for 8,192 queries over 262K keys, which the flash path of a
        causal tail never reads."""
        if self.all_visible:
            return None
        device = self.block_ids.device
        q_len = self.q_slice.stop - self.q_slice.start
        q_pos = torch.arange(self.q_start, self.q_start + q_len, device=device)
        k_pos = torch.arange(self.kv_start, self.kv_start + self.kv_len, device=device)
        return k_pos[None, :] <= q_pos[:, None]


def seq_views(meta: AttentionMetadata) -> list[SeqView]:
    cached: list[SeqView] | None = meta.scratch.get("seq_views")
    if cached is not None:
        return cached
    views = []
    for i in range(meta.num_seqs):
        q_len, kv_len = meta.q_lens[i], meta.kv_lens[i]
        start = meta.block_starts[i]
        block_ids = meta.block_ids[start : start + -(-kv_len // meta.block_size)]
        first_q, first_k = meta.q_start_pos[i], meta.kv_start_pos[i]
        views.append(
            SeqView(
                q_slice=slice(meta.cu_q_lens[i], meta.cu_q_lens[i + 1]),
                block_ids=block_ids,
                kv_len=kv_len,
                q_start=first_q,
                kv_start=first_k,
                # The last key must not lie beyond the first query for the mask to be all-true.
                all_visible=first_k + kv_len - 1 <= first_q,
                causal_tail=kv_len >= q_len and first_k + kv_len == first_q + q_len,
                first_block=_first_of_consecutive(block_ids),
            )
        )
    meta.scratch["seq_views"] = views
    return views


def new_kv_pool(
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A zeroed block pool of shape [num_blocks, block_size, kv_heads, head_dim] stored
    head-major ([kv_heads, num_blocks, block_size, head_dim] in memory; see `KVCache`).

    Backends accept any pool whose head_dim is contiguous and whose (block, token) dims merge
    into one: they index by shape and read strides."""
    storage = torch.zeros(kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)
    return storage.permute(1, 2, 0, 3)


def gather_kv(cache: torch.Tensor, view: SeqView) -> torch.Tensor:
    """The sequence's keys (or values) from a block pool: [kv_len, kv_heads, head_dim]; a view
    of the pool when the blocks are consecutive, else a copy laid out head-major (each kv
    head's keys one contiguous matrix, as attention reads them)."""
    if view.first_block is not None:
        flat = cache.flatten(0, 1)  # a view: the pool's block and token dims merge
        return flat.narrow(0, view.first_block * cache.shape[1], view.kv_len)
    blocks = cache.permute(2, 0, 1, 3).index_select(1, view.block_ids)
    return blocks.flatten(1, 2)[:, : view.kv_len].transpose(0, 1)


def _first_of_consecutive(block_ids: torch.Tensor) -> int | None:
    ids = block_ids.tolist()
    if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
        return None
    return int(ids[0])
