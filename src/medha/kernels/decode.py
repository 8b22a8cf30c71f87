"""Attention of a one-token query (a decode) that sees every key it is given.

The general path (`reference.attend`) masks, runs logsumexp and then exp over the scores (two
passes), normalises the [heads, kv_len] probabilities and guards rows that see no key. A decode
appending to this shard, or reading an earlier KVP shard, sees all of its keys, so none of that
is needed. Two forms, both reading K/V where they lie (for a sequence on consecutive blocks,
each kv head's keys are one contiguous matrix of `KVCache`'s head-major pools):

- matmuls over the kv heads (Q.K^T, then P.V) with one max, one exp, one sum, the output
  normalised at [heads, head_dim] and lse = max + log(sum): each kv head's keys are read once
  for all the query heads that share them;
- torch's CPU flash kernel, which takes the query heads against the kv heads directly (GQA
  without expanding K/V) and returns the lse from its single online-softmax pass.

Measured on this 2-core CPU (SmolLM2-135M, 1K-token context, median step time): on one thread
the matmul form is ~1 ms per step faster (44.6 vs 46.9 ms); on two, flash is (~32 vs ~33 ms),
as it spreads 9 query heads over the threads rather than 3 kv heads. In bf16 the flash kernel
is ~6x slower than the matmul form (4K keys: 2.5 vs 0.42 ms on two threads), so bf16 always
takes the matmul form. Up to 1K keys it converts K and V to fp32 and computes in fp32. Past
that the conversion and the fp32 products fall out of cache and cost more than the attention
(one layer, two threads, 2K keys: 1.32 ms in fp32 against 0.34 ms with bf16 products and an
fp32 softmax; 1K keys: 0.25 against 0.26), so from NATIVE_BF16_KEYS on the products stay in
bf16, one matmul per kv head (a batched matmul over the pool's head stride copied the keys
first: 0.54 against 0.13 ms at 6K keys), and P.V multiplies the unnormalised weights rounded to
bf16 (normalised afterwards in fp32). A SmolLM2 decode step over a 6K-token context then takes
50-58 ms instead of 78 (38 ms over 300 tokens). Measured on a CPU with AVX-512 BF16; where bf16
matmuls are emulated the crossover may lie elsewhere. CPU only: on CUDA this form keeps fp32.
All forms are the softmax up to rounding (the exactness tests bound it).
"""

from __future__ import annotations

import torch

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

NATIVE_BF16_KEYS = 1024
"""From this many keys a bf16 decode on a CPU multiplies in bf16 (the products accumulate in
fp32 and round to bf16, as the scores of HF's eager bf16 attention do) and only the softmax runs
in fp32: converting K and V to fp32 costs more than the attention from there on (see the module
docstring)."""


def attend_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, D], k/v [kv_len >= 1, Hkv, D] -> (out [1, Hq, D], lse fp32 [1, Hq]); out is
    fp32 or q's dtype."""
    if takes_flash(q):
        return attend_one_query_flash(q, k, v, scale)
    return attend_one_query_matmul(q, k, v, scale)


def takes_flash(q: torch.Tensor) -> bool:
    """Whether a decode with queries like `q` runs faster through the CPU flash kernel (fp32 on
    several threads) than in the matmul form."""
    return (
        q.is_cpu
        and _CPU_FLASH is not None
        and q.dtype == torch.float32
        and torch.get_num_threads() > 1
    )


def attend_one_query_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through torch's CPU flash kernel (CPU only)."""
    assert _CPU_FLASH is not None
    num_heads, head_dim = q.shape[1], q.shape[2]
    # [batch 1, heads, length, D] views; query head h reads kv head h // group (HF's repeat_kv).
    out, lse = _CPU_FLASH(
        q.unsqueeze(2),
        k.unsqueeze(0).transpose(1, 2),
        v.unsqueeze(0).transpose(1, 2),
        0.0,
        False,
        scale=scale,
    )
    lse = lse.reshape(1, num_heads)
    return out.reshape(1, num_heads, head_dim), (lse if lse.dtype == torch.float32 else lse.float())


def attend_one_query_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with matmuls over the kv heads and the softmax in fp32; the products in fp32
    too, except for bf16 on a CPU over NATIVE_BF16_KEYS keys or more."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    # Query head h = kv_head * group + member (HF's repeat_kv order): K/V are read in place.
    queries = q.reshape(kv_heads, group, head_dim)
    if q.dtype == torch.bfloat16 and q.is_cpu and k.shape[0] >= NATIVE_BF16_KEYS:
        # One matmul per kv head reads its keys in place as a transposed matrix; a batched
        # matmul over the cache pool's head stride would copy them all first.
        scores = torch.stack([queries[h] @ k[:, h].T for h in range(kv_heads)]).float()
    else:
        if q.dtype != torch.float32:
            queries, k, v = queries.float(), k.float(), v.float()
        scores = torch.bmm(queries, k.permute(1, 2, 0))
    scores.mul_(scale)
    peak = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(peak).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.bmm(weights.to(v.dtype), v.transpose(0, 1)).float().div_(total)  # [Hkv, group, D]
    lse = peak.add_(total.log_())
    return out.view(1, num_heads, head_dim), lse.view(1, num_heads)
