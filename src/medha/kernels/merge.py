"""Exact merge of attention partials computed over disjoint parts of the keys (KV parallelism).

For partials (O_j, lse_j) over key sets K_j:
    m = max_j lse_j;  w_j = exp(lse_j - m);  O = sum_j w_j O_j / sum_j w_j;  lse = m + log sum_j w_j
A part with no keys has lse = -inf and weight 0; if every part is empty the result is O = 0,
lse = -inf (and never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention_partials(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs: n x [..., H, D]; lses: n x [..., H] (fp32) -> (out [..., H, D], lse [..., H])."""
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(
            f"need as many outputs as lses, at least one (got {len(outputs)}, {len(lses)})"
        )
    if len(outputs) == 1:
        return outputs[0], lses[0]
    lse = torch.stack([x.float() for x in lses])  # [n, ..., H]
    out = torch.stack([x.float() for x in outputs])  # [n, ..., H, D]
    peak = lse.max(dim=0).values
    # All parts empty: peak is -inf; shifting by 0 keeps every weight exp(-inf) = 0, not NaN.
    safe_peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    weights = torch.exp(lse - safe_peak)
    total = weights.sum(dim=0)
    merged = (weights.unsqueeze(-1) * out).sum(dim=0) / total.clamp_min(1e-38).unsqueeze(-1)
    merged_lse = torch.where(
        total > 0, safe_peak + torch.log(total), torch.full_like(peak, float("-inf"))
    )
    return merged.to(outputs[0].dtype), merged_lse
