"""KV-cache parallelism on the workers: which part of a sequence's KV this KVP group attends to in
a step, and the exact merge of every group's attention partials.

Every KVP group runs every sequence of every step (design choice, see docs/parallelism.md): a
group holding no KV of a sequence attends to nothing and contributes (out = 0, lse = -inf), the
neutral element of the merge. So the groups of a stage always run the same collectives in the
same order, whatever the placement, and after the merge all of them hold the same hidden
states: the next stage and the sampler need no further exchange.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from medha.kernels.merge import merge_attention_partials
from medha.model.runner import StepSeq
from medha.parallel.messages import ShardWork


def shard_step_seq(work: ShardWork, block_table: list[int]) -> StepSeq:
    """This group's view of one sequence's step (see medha.model.runner.StepSeq)."""
    if work.kv_start is None:
        # No KV here: nothing to attend to, nothing stored (kv_len 0, no append).
        return StepSeq(work.token_ids, work.start, (), work.samples, work.start, 0)
    kv_len = None if work.appends else work.kv_end - work.kv_start
    return StepSeq(work.token_ids, work.start, block_table, work.samples, work.kv_start, kv_len)


class KvpMerge:
    """The PartialCombiner of a KVP group: all-gather (out, lse) of every group, merge exactly.

    out and lse travel as one fp32 tensor [T, H, D + 1] (one collective per layer). Every rank
    merges the same partials in the same (rank) order, so all get bitwise the same result.
    """

    def __init__(self, group: Any, size: int) -> None:
        self.group = group
        self.size = size

    def __call__(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1).contiguous()
        parts = [torch.empty_like(packed) for _ in range(self.size)]
        dist.all_gather(parts, packed, group=self.group)
        outs = [p[..., :-1] for p in parts]
        lses = [p[..., -1] for p in parts]
        merged, _ = merge_attention_partials(outs, lses)
        return merged.to(out.dtype)
