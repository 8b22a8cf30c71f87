"""Attention through torch's fused SDPA kernels that also return the log-sum-exp.

The public `F.scaled_dot_product_attention` drops the lse, which KVP needs, so this calls the aten
ops underneath it: the flash kernel on CPU and the memory-efficient kernel on CUDA. One call per
prefill chunk: the batch is ragged.

A prefill chunk over a cached prefix needs bottom-right causal masking, which these kernels'
`is_causal` (top-left) does not do. Rather than pay for a dense mask, the chunk attends in two
calls, fully to the prefix and causally to itself, and the two partials are merged exactly by
their lse: causal calls skip the masked half of the work. Decode rows that see all their keys
are attended together in buckets on a CPU (`medha.kernels.decode_batch`); any other goes to
`medha.kernels.decode`, which reads K/V in place without expanding their heads.
"""

from __future__ import annotations

import torch

from medha.kernels.decode import attend_one_query, takes_flash
from medha.kernels.decode_batch import DecodeBucket, attend_decode_bucket, decode_buckets
from medha.kernels.layout import SeqView, gather_kv, seq_views
from medha.kernels.merge import merge_attention_partials
from medha.kernels.metadata import AttentionMetadata
from medha.kernels.reference import attend


def sdpa_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_attention`."""
    views = seq_views(meta)
    if len(views) == 1 and views[0].kv_len > 0:
        # One sequence owns every row (a lone request's decode): no scatter into a batch.
        o, row_lse = _attend_seq(q, k_cache, v_cache, views[0], scale)
        return (o if o.dtype == q.dtype else o.to(q.dtype)), row_lse
    num_tokens, num_heads, _head_dim = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    buckets = _buckets(q, meta, views)
    for bucket in buckets:
        o, rows_lse = attend_decode_bucket(q, k_cache, v_cache, bucket, scale)
        out.index_copy_(0, bucket.rows, o.to(q.dtype))
        lse.index_copy_(0, bucket.rows, rows_lse)
    bucketed: set[int] = meta.scratch["bucketed_rows"]
    for view in views:
        if view.kv_len == 0 or view.q_slice.start in bucketed:
            continue
        o, row_lse = _attend_seq(q[view.q_slice], k_cache, v_cache, view, scale)
        out[view.q_slice] = o
        lse[view.q_slice] = row_lse
    return out, lse


def _buckets(q: torch.Tensor, meta: AttentionMetadata, views: list[SeqView]) -> list[DecodeBucket]:
    """The step's decode buckets (built by its first layer) and, in the scratch, the query rows
    they cover. CPU only: they were measured there, and on CUDA the Triton backend is the one
    for speed. No buckets where single decodes take the CPU flash kernel, which reads
    consecutive blocks in place: there the gather costs more than the calls it saves (fp32 on
    two threads, attention of 8 decodes over 300 keys in a SmolLM2 step: 34 against 17 ms; in
    bf16, where a decode takes the matmul form: 12.5 against 24 ms)."""
    buckets: list[DecodeBucket] | None = meta.scratch.get("decode_buckets")
    if buckets is None:
        use = q.is_cpu and not takes_flash(q)
        buckets = decode_buckets(views, meta.block_size) if use else []
        meta.scratch["decode_buckets"] = buckets
        meta.scratch["bucketed_rows"] = {row for bucket in buckets for row in bucket.rows.tolist()}
    return buckets


def _attend_seq(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, view: SeqView, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's queries [q_len, H, D] over its keys -> (out [q_len, H, D], lse fp32)."""
    k, v = gather_kv(k_cache, view), gather_kv(v_cache, view)
    if q.shape[0] == 1:
        if view.all_visible:
            return attend_one_query(q, k, v, scale)
        return attend(q, k, v, view.visible, scale)
    qs = q.transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
    # The CPU flash kernel maps query head h to kv head h // group itself; CUDA's wants equal
    # head counts.
    group = 1 if q.is_cpu else q.shape[1] // k_cache.shape[2]
    k, v = _expand_heads(k, group), _expand_heads(v, group)
    if view.causal_tail:
        return _prefix_then_causal(qs, k, v, scale)
    o, row_lse = _fused(qs, k, v, scale, mask=_additive_mask(view, q.dtype))
    if view.visible is not None:  # only here and in _additive_mask: a causal tail reads none
        # Fused kernels leave rows that see no key undefined; attention over nothing is
        # out = 0, lse = -inf (the merge's neutral element: a KVP shard after q).
        blind = ~view.visible.any(dim=-1)
        o = o.masked_fill(blind[:, None, None], 0.0)
        row_lse = row_lse.masked_fill(blind[:, None], float("-inf"))
    return o, row_lse


def _prefix_then_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q_len, kv_len = q.shape[2], k.shape[2]
    prefix = kv_len - q_len
    own = _fused(q, k[:, :, prefix:], v[:, :, prefix:], scale, causal=True)
    if prefix == 0:
        return own
    cached = _fused(q, k[:, :, :prefix], v[:, :, :prefix], scale)
    out, lse = merge_attention_partials([cached[0], own[0]], [cached[1], own[1]])
    return out, lse


def _fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, H, L, D] inputs -> (out [q_len, H, D], lse fp32 [q_len, H])."""
    q_len = q.shape[2]
    if q.is_cuda:
        if mask is not None:
            # The efficient kernel wants the bias broadcast over batch and heads.
            mask = mask.expand(1, q.shape[1], *mask.shape)
        out, lse, _seed, _offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, causal, scale=scale
        )
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    # The CUDA kernel pads lse's query dimension to a multiple of 32.
    return out[0].transpose(0, 1), lse[0, :, :q_len].transpose(0, 1).float()


def _expand_heads(kv: torch.Tensor, group: int) -> torch.Tensor:
    """[kv_len, Hkv, D] -> [1, Hkv * group, kv_len, D]: query head h reads kv head h // group."""
    kv_len, kv_heads, head_dim = kv.shape
    kv = kv.transpose(0, 1).unsqueeze(1).expand(kv_heads, group, kv_len, head_dim)
    return kv.reshape(1, kv_heads * group, kv_len, head_dim)


def _additive_mask(view: SeqView, dtype: torch.dtype) -> torch.Tensor | None:
    if view.visible is None:
        return None
    mask = torch.zeros(view.visible.shape, dtype=dtype, device=view.visible.device)
    return mask.masked_fill_(~view.visible, float("-inf"))


def sdpa_available(device: torch.device) -> bool:
    name = (
        "_scaled_dot_product_efficient_attention"
        if device.type == "cuda"
        else "_scaled_dot_product_flash_attention_for_cpu"
    )
    return hasattr(torch.ops.aten, name)
