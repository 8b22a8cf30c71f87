"""Attention of a step's decodes together: a few batched ops per layer instead of a few per decode.

A decode's attention is tiny (one query row per head over a few hundred keys on a chat), so on
a CPU its cost is the ~10 torch calls it takes, not the arithmetic: ~90 us per decode per layer
in bf16 on the 2-core development machine, ~3 ms per decode per SmolLM2 step. With four chats
decoding beside a prefill chunk that is 12 ms of a 150 ms iteration. Here every decode of a
bucket reads its keys through one gather of padded slot lists, and the bucket attends in one
pass of two batched matmuls (fp32, one max, one exp, one sum), padding masked by a -inf bias.

The win is the calls saved, so it holds only while the keys are few. The gather copies every
key (a lone decode over consecutive blocks reads them in place), and it grows with the context:
on that machine, whole SmolLM2 steps of decodes in bf16 on two threads took 61 against 68 ms
(8 decodes over 200 keys), 84 against 88 ms (over 500), but 97-118 against 78 ms (8 over 1,000)
and 302-446 against 90-182 ms (4 over 4,000, where the large temporaries also made glibc's
allocator map and unmap pages on every call). So only decodes over at most `MAX_KEYS` keys are
bucketed, a bucket holds at most `MAX_PADDED_KEYS` keys in all, and decodes are sorted by
context and cut so that a bucket's padded keys (size x longest context) stay within
`PADDING_ALLOWANCE` of its real keys. A decode left without a partner keeps its own call.

Padding repeats the decode's own first key, masked: a padded slot never reads another request's
KV (or a block's stale tail), so a NaN in someone else's cache cannot leak into this one.

Every decode here sees all of its keys (a decode appending to this shard, or a KVP group's
earlier shard), so the result is the softmax up to rounding, as in `decode.attend_one_query`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medha.kernels.layout import SeqView

PADDING_ALLOWANCE = 1.5
"""A bucket's padded keys (size x longest context) may exceed its real keys by this factor."""
MAX_KEYS = 512
"""Decodes over more keys keep their own call (see the module docstring)."""
MAX_PADDED_KEYS = 8192
"""A bucket's size x longest context at most: its fp32 K and V copies stay ~6 MB each at
SmolLM2's head layout."""


@dataclass(frozen=True)
class DecodeBucket:
    """Decodes attended together; built once per step, shared by every layer."""

    rows: torch.Tensor
    """int64 [B]: each decode's query row in the step."""
    slots: torch.Tensor
    """int64 [B * width]: flat cache slots (block * block_size + offset) of each decode's keys,
    padded to `width` with the decode's own first slot."""
    bias: torch.Tensor
    """fp32 [B, 1, width]: 0 on a decode's keys, -inf on its padding."""
    width: int


def decode_buckets(views: Sequence[SeqView], block_size: int) -> list[DecodeBucket]:
    """Buckets of two or more decodes (one query row that sees all of its 1 to `MAX_KEYS`
    keys) among `views`."""
    decodes = [
        view
        for view in views
        if view.q_slice.stop - view.q_slice.start == 1
        and view.all_visible
        and 0 < view.kv_len <= MAX_KEYS
    ]
    decodes.sort(key=lambda view: view.kv_len, reverse=True)
    buckets = []
    start = 0
    while start < len(decodes):
        width = decodes[start].kv_len
        end, real = start + 1, width
        while (
            end < len(decodes)
            and (end - start + 1) * width <= MAX_PADDED_KEYS
            and (end - start + 1) * width <= PADDING_ALLOWANCE * (real + decodes[end].kv_len)
        ):
            real += decodes[end].kv_len
            end += 1
        if end - start > 1:
            buckets.append(_bucket(decodes[start:end], width, block_size))
        start = end
    return buckets


def _bucket(views: Sequence[SeqView], width: int, block_size: int) -> DecodeBucket:
    device = views[0].block_ids.device
    offsets = torch.arange(width, device=device)
    block_of, within = offsets // block_size, offsets % block_size
    slots = []
    for view in views:
        blocks = view.block_ids.index_select(0, block_of.clamp(max=len(view.block_ids) - 1))
        own = blocks * block_size + within
        slots.append(torch.where(offsets < view.kv_len, own, own[0]))
    lengths = torch.tensor([view.kv_len for view in views], device=device)
    bias = torch.zeros(len(views), 1, width, dtype=torch.float32, device=device)
    bias.masked_fill_(offsets[None, None, :] >= lengths[:, None, None], float("-inf"))
    return DecodeBucket(
        rows=torch.tensor([view.q_slice.start for view in views], device=device),
        slots=torch.cat(slots),
        bias=bias,
        width=width,
    )


def attend_decode_bucket(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bucket: DecodeBucket,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bucket's rows of q [T, Hq, D] over their keys -> (out fp32 [B, Hq, D], lse fp32
    [B, Hq]). Caches: [num_blocks, block_size, Hkv, D] in any order whose block and token dims
    merge (see `layout.new_kv_pool`)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    size, width = bucket.rows.numel(), bucket.width
    # [Hkv, B * width, D]: one gather per cache, each kv head's keys of a decode contiguous.
    keys = _gather(k_cache, bucket.slots).view(kv_heads * size, width, head_dim)
    values = _gather(v_cache, bucket.slots).view(kv_heads * size, width, head_dim)
    # Query head h = kv_head * group + member (HF's repeat_kv order), batched as (kv head, decode).
    queries = q.index_select(0, bucket.rows).float().view(size, kv_heads, group, head_dim)
    queries = queries.transpose(0, 1).reshape(kv_heads * size, group, head_dim)
    scores = torch.bmm(queries, keys.transpose(1, 2))  # [Hkv * B, group, width]
    scores.mul_(scale)
    scores.view(kv_heads, size, group, width).add_(bucket.bias)
    peak = scores.amax(dim=-1, keepdim=True)  # finite: every decode sees at least one key
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.bmm(weights, values).div_(total)  # [Hkv * B, group, D]
    lse = peak.add_(total.log_())
    out = out.view(kv_heads, size, group, head_dim).transpose(0, 1).reshape(size, num_heads, -1)
    lse = lse.view(kv_heads, size, group).transpose(0, 1).reshape(size, num_heads)
    return out, lse


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys (or values) at `slots`, head-major and in fp32: [Hkv, len(slots), D]."""
    pool = cache.permute(2, 0, 1, 3).flatten(1, 2)  # a view: block and token dims merge
    return pool.index_select(1, slots).float()
