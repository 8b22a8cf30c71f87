"""Attention through torch's fused SDPA kernels that also return the log-sum-exp.

The public `F.scaled_dot_product_attention` drops the lse, which KVP needs, so this calls the aten
ops underneath it: the flash kernel for CPU and the memory-efficient kernel on CUDA (both accept an
arbitrary mask, which a prefill chunk over a cached prefix needs: bottom-right causal). One call
per sequence: the batch is ragged. Decode rows skip the fused kernel: for one query its launch
and the K/V head expansion cost more than the plain math (measured on CPU: 2x slower decode).
"""

from __future__ import annotations

import torch

from medha.kernels.layout import SeqView, gather_kv, seq_views
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
    num_tokens, num_heads, _head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.zeros_like(q)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    fused = _cuda_fused if q.is_cuda else _cpu_fused
    for view in seq_views(meta):
        if view.kv_len == 0:
            continue
        if view.q_slice.stop - view.q_slice.start == 1:
            k, v = gather_kv(k_cache, view), gather_kv(v_cache, view)
            o, row_lse = attend(q[view.q_slice], k, v, view.visible, scale)
            out[view.q_slice], lse[view.q_slice] = o.to(q.dtype), row_lse
            continue
        # [1, H, L, D] layout; GQA by expanding kv heads (a view, no copy).
        qs = q[view.q_slice].transpose(0, 1).unsqueeze(0)
        k = _expand_heads(gather_kv(k_cache, view), group)
        v = _expand_heads(gather_kv(v_cache, view), group)
        o, row_lse = fused(qs, k, v, _additive_mask(view, q.dtype), scale)
        q_len = qs.shape[2]
        o, row_lse = o[0].transpose(0, 1), row_lse[0, :, :q_len].transpose(0, 1).float()
        if view.visible is not None:
            # Fused kernels leave rows that see no key undefined; attention over nothing is
            # out = 0, lse = -inf (the merge's neutral element: a KVP shard wholly after q).
            blind = ~view.visible.any(dim=-1)
            o = o.masked_fill(blind[:, None, None], 0.0)
            row_lse = row_lse.masked_fill(blind[:, None], float("-inf"))
        out[view.q_slice] = o
        lse[view.q_slice] = row_lse
    return out, lse


def _expand_heads(kv: torch.Tensor, group: int) -> torch.Tensor:
    kv_len, kv_heads, head_dim = kv.shape
    kv = kv.transpose(0, 1).unsqueeze(1).expand(kv_heads, group, kv_len, head_dim)
    return kv.reshape(1, kv_heads * group, kv_len, head_dim)


def _additive_mask(view: SeqView, dtype: torch.dtype) -> torch.Tensor | None:
    if view.visible is None:
        return None
    mask = torch.zeros(view.visible.shape, dtype=dtype, device=view.visible.device)
    return mask.masked_fill_(~view.visible, float("-inf"))


def _cpu_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return out, lse


def _cuda_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is not None:
        # The efficient kernel wants the bias in q's dtype, broadcast over batch and heads.
        mask = mask.expand(1, q.shape[1], *mask.shape)
    out, lse, _seed, _offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, mask, True, 0.0, False, scale=scale
    )
    return out, lse


def sdpa_available(device: torch.device) -> bool:
    name = (
        "_scaled_dot_product_efficient_attention"
        if device.type == "cuda"
        else "_scaled_dot_product_flash_attention_for_cpu"
    )
    return hasattr(torch.ops.aten, name)
