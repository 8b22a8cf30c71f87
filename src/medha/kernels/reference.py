"""Reference attention over a paged KV cache, in plain torch: the ground truth every other
backend is tested against. Computes in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from medha.kernels.layout import gather_kv, seq_views
from medha.kernels.metadata import AttentionMetadata


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], caches [blocks, block_size, Hkv, D] -> (out [T, Hq, D], lse fp32 [T, Hq]).

    A query that sees no key (a KVP shard holding nothing for it) gets out = 0 and lse = -inf,
    which is exactly the neutral element of the log-sum-exp merge.
    """
    num_tokens, num_heads, head_dim = q.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for view in seq_views(meta):
        if view.kv_len == 0:
            continue
        k, v = gather_kv(k_cache, view), gather_kv(v_cache, view)
        o, row_lse = attend(q[view.q_slice], k, v, view.visible, scale)
        out[view.q_slice] = o.to(q.dtype)
        lse[view.q_slice] = row_lse
    return out, lse


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [q_len, Hq, D], k/v [kv_len, Hkv, D], visible [q_len, kv_len] or None
    -> (out fp32 [q_len, Hq, D], lse fp32 [q_len, Hq])."""
    q_len, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    # Rows ordered (kv head, group member, query): query head h = kv_head * group + member, as
    # in HF's repeat_kv; no copy of K/V per query head.
    qg = q.float().view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(kv_heads, group * q_len, head_dim)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)) * scale
    if visible is not None:
        scores.masked_fill_(~visible.repeat(group, 1), float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN for rows that see nothing; shift those by 0 instead.
    shift = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
    probs = torch.exp(scores - shift.unsqueeze(-1))
    o = torch.bmm(probs, v.float().permute(1, 0, 2))
    o = o.view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, -1, head_dim)
    return o, row_lse.view(kv_heads, group, q_len).permute(2, 0, 1).reshape(q_len, -1)
