"""Exact merge of attention partials in Triton: the reduction of split-KV attention
(flash-decoding) and of KVP shards. Same arithmetic as `medha.kernels.merge`:

    m = max_j lse_j;  w_j = exp(lse_j - m);  O = sum_j w_j O_j / sum_j w_j;  lse = m + log sum_j w_j

A partial with lse = -inf weighs 0; when every partial is empty the result is O = 0, lse = -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def merge_kernel(
    Parts,
    PartLse,
    Out,
    Lse,
    rows,
    num_parts,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_et,
    stride_eh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """Grid (rows,): Parts [S, R, H, D], PartLse [S, R, H] -> Out [., H, D], Lse [., H] at row
    rows[r] (or r), all heads of the row at once."""
    r = tl.program_id(0)
    dst = tl.load(rows + r) if HAS_ROWS else r
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < NUM_HEADS
    hd_ok = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_ptr = PartLse + r * stride_lt + offs_h * stride_lh
    part_ptr = Parts + r * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :]
    peak = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for j in range(num_parts):
        peak = tl.maximum(peak, tl.load(lse_ptr + j * stride_ls, mask=h_ok, other=float("-inf")))
    # Every partial empty: shift by 0 so each weight is exp(-inf) = 0, not NaN.
    safe_peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for j in range(num_parts):
        part_lse = tl.load(lse_ptr + j * stride_ls, mask=h_ok, other=float("-inf"))
        w = tl.exp(part_lse - safe_peak)
        part = tl.load(part_ptr + j * stride_ps, mask=hd_ok, other=0.0)
        acc += w[:, None] * part.to(tl.float32)
        total += w
    seen = total > 0.0
    total_safe = tl.where(seen, total, 1.0)
    out = acc / total_safe[:, None]
    lse = tl.where(seen, safe_peak + tl.log(total_safe), float("-inf"))
    out_ptr = Out + dst * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=hd_ok)
    tl.store(Lse + dst * stride_et + offs_h * stride_eh, lse, mask=h_ok)


def merge_rows_into(
    parts: torch.Tensor,
    part_lse: torch.Tensor,
    rows: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Merge parts [S, R, H, D] / part_lse [S, R, H] into out [., H, D] / lse [., H] (fp32) at
    rows `rows` (int32 [R]; None: rows 0..R-1)."""
    num_parts, num_rows, num_heads, head_dim = parts.shape
    if num_rows == 0:
        return
    if parts.stride(3) != 1 or out.stride(2) != 1:
        raise ValueError("merge needs a unit stride along the head dim")
    merge_kernel[(num_rows,)](
        parts, part_lse, out, lse, rows if rows is not None else part_lse, num_parts,
        parts.stride(0), parts.stride(1), parts.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_ROWS=rows is not None,
    )  # fmt: skip


def merge_partials(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`medha.kernels.merge_attention_partials` in one kernel: outputs n x [..., H, D], lses
    n x [..., H] -> (out [..., H, D] in outputs[0]'s dtype, lse [..., H] fp32)."""
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(
            f"need as many outputs as lses, at least one (got {len(outputs)}, {len(lses)})"
        )
    if len(outputs) == 1:
        return outputs[0], lses[0]
    shape = outputs[0].shape
    heads, head_dim = shape[-2], shape[-1]
    parts = torch.stack(list(outputs)).reshape(len(outputs), -1, heads, head_dim)
    part_lse = torch.stack([x.float() for x in lses]).reshape(len(lses), -1, heads)
    out = torch.empty(parts.shape[1:], dtype=outputs[0].dtype, device=parts.device)
    lse = torch.empty(part_lse.shape[1:], dtype=torch.float32, device=parts.device)
    merge_rows_into(parts, part_lse, None, out, lse)
    return out.reshape(shape), lse.reshape(shape[:-1])
