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
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for view in seq_views(meta):
        if view.kv_len == 0:
            continue
        qs = q[view.q_slice].float()
        q_len = qs.shape[0]
        k = gather_kv(k_cache, view).float()
        v = gather_kv(v_cache, view).float()
        # Rows ordered (kv head, group member, query): query head h = kv_head * group + member,
        # as in HF's repeat_kv.
        qg = qs.view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(kv_heads, group * q_len, head_dim)
        scores = torch.bmm(qg, k.permute(1, 2, 0)) * scale
        if view.visible is not None:
            scores.masked_fill_(~view.visible.repeat(group, 1), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        # exp(-inf - -inf) would be NaN for rows that see nothing; shift those by 0 instead.
        shift = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        probs = torch.exp(scores - shift.unsqueeze(-1))
        o = torch.bmm(probs, v.permute(1, 0, 2))
        o = (
            o.view(kv_heads, group, q_len, head_dim)
            .permute(2, 0, 1, 3)
            .reshape(q_len, -1, head_dim)
        )
        out[view.q_slice] = o.to(q.dtype)
        lse[view.q_slice] = row_lse.view(kv_heads, group, q_len).permute(2, 0, 1).reshape(q_len, -1)
    return out, lse
