"""Triton attention of query chunks over a paged KV cache, returning (output, lse).

One program computes a tile of BLOCK_M query rows against one kv head. The rows are (token,
group member) pairs packed token-major: with GQA the `group` query heads that share a kv head
read each K/V tile once, so a chunk of c tokens is a c * group-row matmul against the keys. That
is what makes small chunks cheap (the Medha paper's case for chunked prefill): arithmetic
intensity grows with c * h_q / h_kv, not with the context.

The keys are tiled by BLOCK_N and read through the block table (any block size, any block
order). Causality is by absolute position: a row at position p sees the shard's keys at
positions <= p. Key tiles every row of the tile sees run without a mask; only the tail tiles that
reach past the tile's first query are masked. A KVP shard lying wholly before the queries is
therefore plain non-causal attention, with no special case.

When the grid of (query tile, kv head) programs is too small to fill the GPU (small chunks at long
context, decodes), the keys are split across a third grid axis as well: each split writes a
partial (output, lse) and `medha.kernels.triton_merge` combines them exactly. Flash-decoding
(`medha.kernels.triton_decode`) is this same kernel with one token per sequence.

Softmax runs in base 2 (exp2) with fp32 accumulation; fp32 inputs use IEEE dot products (not
TF32), so fp32 results match the reference to ~1e-6. bf16/fp16 inputs multiply on tensor cores;
the probabilities are rounded to the input dtype before the P @ V product, as in FlashAttention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from medha.kernels.metadata import AttentionMetadata
from medha.kernels.triton_merge import merge_rows_into

_LOG2E = math.log2(math.e)
# Columns of the per-sequence table a launch reads (int32 [num_seqs, 8]).
_INFO_COLS = 8
# A chunk's KV split is at least this long: a split's partial costs a write and a merge of
# rows x heads x D floats, worth it only over thousands of keys.
MIN_SPLIT_KEYS = 4096


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    table,
    kvh,
    start,
    kv_len,
    kv_start,
    q_pos,
    offs_d,
    d_ok,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of one tile of BLOCK_N keys starting at shard offset `start`."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        n_ok = offs_n < kv_len
        blk = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    else:  # every key of an unmasked tile exists and is visible
        blk = tl.load(table + offs_n // PAGE).to(tl.int64)
    slot = offs_n % PAGE
    k_ptrs = K + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh
    k_ptrs += offs_d[:, None]
    v_ptrs = V + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
    v_ptrs += offs_d[None, :]
    # Masks only where needed: unmasked tiles of a power-of-two head dim load without one.
    if MASKED:
        k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if MASKED:
        visible = n_ok[None, :] & (kv_start + offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    # m_i starts at a finite -1e30, so a row that sees none of these keys keeps exp2(-inf) = 0
    # weights and alpha = 1: no NaN from (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p, v = p.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def paged_attention_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    seq_info,
    tiles,
    block_ids,
    scale_log2,
    split_size,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (tiles, kv heads, splits). Without SPLIT, writes out [T, Hq, D] and lse [T, Hq] at the
    query rows; with SPLIT, writes fp32 partials [splits, rows of this launch, Hq, (D)]."""
    tile = tl.program_id(0)
    # int64: in head-major pools a kv head's stride is the whole pool's blocks x tokens x D,
    # so kvh * stride passes 2^31 elements once a layer's pool is a few GiB.
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq = tl.load(tiles + 2 * tile)
    row0 = tl.load(tiles + 2 * tile + 1)
    info = seq_info + seq * 8
    q_row0 = tl.load(info)
    ws_row0 = tl.load(info + 1)
    q_len = tl.load(info + 2)
    q_start = tl.load(info + 3)
    kv_len = tl.load(info + 4)
    kv_start = tl.load(info + 5)
    table = block_ids + tl.load(info + 6).to(tl.int64)  # the sequence's blocks, in order

    rows = row0 + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = token < q_len
    q_pos = q_start + token
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + (q_row0 + token)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # Keys [0, n_full) are visible to every row of the tile, [n_full, n_end) to some.
    first_token = row0 // GROUP
    last_token = (tl.minimum(row0 + BLOCK_M, q_len * GROUP) - 1) // GROUP
    n_end = tl.minimum(kv_len, q_start + last_token - kv_start + 1)
    n_full = tl.minimum(kv_len, q_start + first_token - kv_start + 1)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, n_end)
    full_hi = lo + tl.maximum(tl.minimum(hi, n_full) - lo, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K, V, table, kvh, start, kv_len, kv_start, q_pos, offs_d, d_ok,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, PAGE, False, BLOCK_D == HEAD_DIM, PRECISION, UPCAST,
        )  # fmt: skip
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K, V, table, kvh, start, kv_len, kv_start, q_pos, offs_d, d_ok,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, PAGE, True, BLOCK_D == HEAD_DIM, PRECISION, UPCAST,
        )  # fmt: skip

    # A row that saw no key: out = 0, lse = -inf (the merge's neutral element).
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if SPLIT:
        out_rows = ws_row0 + token
        Out += split.to(tl.int64) * stride_os
        Lse += split.to(tl.int64) * stride_ls
    else:
        out_rows = q_row0 + token
    tl.store(
        Out + out_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + out_rows * stride_lt + head * stride_lh, lse, mask=row_ok)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about one kernel launch that every layer of a step shares."""

    seq_info: torch.Tensor
    """int32 [n, 8]: query row, partial row, q_len, q_start, kv_len, kv_start, offset of its
    blocks in AttentionMetadata.block_ids, unused."""
    tiles: torch.Tensor
    """int32 [num_tiles, 2]: (index into seq_info, first packed row)."""
    rows: torch.Tensor
    """int32 [rows of this launch]: the query row of each partial row (for the merge)."""
    num_tiles: int
    num_splits: int
    split_size: int
    config: TileConfig


def plan_launch(
    meta: AttentionMetadata,
    seqs: Sequence[int],
    *,
    group: int,
    kv_heads: int,
    config: TileConfig,
    target_programs: int,
    min_split_keys: int,
    num_splits: int | None = None,
) -> LaunchPlan:
    """Tile the queries of sequences `seqs` of the batch and decide the KV split: enough splits
    that (tiles x kv heads x splits) reaches `target_programs`, each at least `min_split_keys`
    keys long (or exactly `num_splits`)."""
    info: list[list[int]] = []
    tiles: list[tuple[int, int]] = []
    rows: list[int] = []
    for local, i in enumerate(seqs):
        q_len = meta.q_lens[i]
        q_row0 = meta.cu_q_lens[i]
        info.append(
            [
                q_row0,
                len(rows),
                q_len,
                meta.q_start_pos[i],
                meta.kv_lens[i],
                meta.kv_start_pos[i],
                meta.block_starts[i],
                0,
            ]
        )
        rows.extend(range(q_row0, q_row0 + q_len))
        tiles.extend((local, r) for r in range(0, q_len * group, config.block_m))
    max_keys = max((meta.kv_lens[i] for i in seqs), default=0)
    if num_splits is None:
        wanted = -(-target_programs // max(1, len(tiles) * kv_heads))
        num_splits = max(1, min(wanted, max_keys // max(1, min_split_keys)))
    num_splits = max(1, min(num_splits, -(-max_keys // config.block_n)))
    split_keys = -(-max(max_keys, 1) // num_splits)
    split_size = -(-split_keys // config.block_n) * config.block_n
    device = meta.block_ids.device
    return LaunchPlan(
        seq_info=torch.tensor(info, dtype=torch.int32).reshape(-1, _INFO_COLS).to(device),
        tiles=torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2).to(device),
        rows=torch.tensor(rows, dtype=torch.int32).to(device),
        num_tiles=len(tiles),
        num_splits=num_splits,
        split_size=split_size,
        config=config,
    )


def launch(
    plan: LaunchPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Run the plan: write out [T, Hq, D] and lse [T, Hq] at the query rows of its sequences."""
    if plan.num_tiles == 0:
        return
    _, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the Triton attention kernels need a unit stride along the head dim")
    if block_ids.numel() == 0:  # no sequence holds keys in this shard: nothing is read
        block_ids = torch.zeros(1, dtype=torch.int64, device=q.device)
    split = plan.num_splits > 1
    if split:
        part_out, part_lse = new_partials(plan, num_heads, head_dim, q.device)
        dst_out, dst_lse = part_out, part_lse
        os_, ls_ = part_out.stride(0), part_lse.stride(0)
    else:
        dst_out, dst_lse, os_, ls_ = out, lse, 0, 0
    cfg = plan.config
    # Triton's interpreter multiplies bf16/fp16 as raw integers: there the operands go to fp32
    # (bf16 x bf16 products are exact in fp32, as on tensor cores; p is still rounded to q's dtype).
    upcast = q.dtype != torch.float32 and q.device.type == "cpu"
    paged_attention_kernel[(plan.num_tiles, kv_heads, plan.num_splits)](
        q, k_cache, v_cache, dst_out, dst_lse, plan.seq_info, plan.tiles, block_ids,
        scale * _LOG2E, plan.split_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        os_, dst_out.stride(-3), dst_out.stride(-2),
        ls_, dst_lse.stride(-2), dst_lse.stride(-1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(max(head_dim, 16)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE=k_cache.shape[1], SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        merge_rows_into(part_out, part_lse, plan.rows, out, lse)


def new_partials(
    plan: LaunchPlan, num_heads: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised fp32 partials [splits, rows, Hq, D] and their lse [splits, rows, Hq]: every
    split writes all of its rows, empty ones included (the tests poison these to prove it)."""
    shape = (plan.num_splits, plan.rows.numel(), num_heads)
    return (
        torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.float32, device=device),
    )


def prefill_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tile sizes for query chunks. The interpreter gets small tiles (fast, and several tiles per
    test sequence); the GPU the shapes of Triton's fused-attention tutorial for 16-bit inputs,
    and smaller key tiles and fewer stages for fp32, whose tiles take twice the shared memory."""
    if device.type != "cuda":
        return TileConfig(block_m=16, block_n=16)
    if dtype == torch.float32:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
