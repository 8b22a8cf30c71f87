"""KV-cache parallelism on the workers: which part of a sequence's KV this KVP group attends to in
a step, and the exact merge of the attention partials of the groups a sequence runs on.

A group runs only the sequences with KV on it (medha.parallel.placement). The sequences that run
on several groups (a long request's) have their query rows in the step's merge buffer, laid out
the same on every group: each layer, every group of the stage all-gathers the buffer, holding its
partials (out, lse) in the rows of the sequences it runs and the merge's neutral element
(out = 0, lse = -inf) elsewhere, so the groups always make the same collectives in the same
order, whatever each runs. The merge gives every group that runs a sequence the same attention
output for it (bit for bit; their later matmuls may round it differently, as their batches
differ). A sequence on one group needs no merge: its output is its group's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from medha.kernels.merge import merge_attention_partials
from medha.model.prompt_scoring import to_device
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
    """The PartialCombiner of a KVP group: all-gather every group's partials of the step's merge
    buffer, merge them exactly, and put the merged rows back in this group's batch.

    The buffer is one fp32 tensor [rows, H, D + 1] (out and lse: one collective per layer). Every
    rank merges the same partials in the same (rank) order, so all get bitwise the same result.
    `prepare` sets the buffer's layout before each step.
    """

    def __init__(
        self, group: Any, size: int, heads: int, head_dim: int, device: torch.device
    ) -> None:
        self.group = group
        self.size = size
        self.heads, self.head_dim, self.device = heads, head_dim, device
        self.rows = 0
        self._batch_rows = torch.empty(0, dtype=torch.int64)
        self._slots = torch.empty(0, dtype=torch.int64)
        self._whole = False

    def prepare(self, works: Sequence[ShardWork], merge_rows: int) -> None:
        """The step's layout: `works` are the sequences this group runs, in batch order;
        `merge_rows` the rows of the buffer (ShardStep.merge_rows)."""
        self.rows = merge_rows
        batch_rows: list[int] = []
        slots: list[int] = []
        offset = 0
        for work in works:
            count = len(work.token_ids)
            if work.merge_offset is not None:
                batch_rows.extend(range(offset, offset + count))
                slots.extend(range(work.merge_offset, work.merge_offset + count))
            offset += count
        # The usual case of a long request's steps: the batch is the buffer, row for row.
        self._whole = batch_rows == slots and len(slots) == offset == merge_rows
        if not self._whole:
            self._batch_rows = to_device(batch_rows, self.device)
            self._slots = to_device(slots, self.device)

    def __call__(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        if self.rows == 0:
            return out
        if self._whole:
            packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)
            return self._merged(packed).to(out.dtype)
        buffer = self._neutral()
        if not len(self._slots):  # none of the merged sequences runs here
            self._gather(buffer)
            return out
        mine = self._batch_rows
        own_out = out.index_select(0, mine).float()
        own_lse = lse.index_select(0, mine).float().unsqueeze(-1)
        buffer.index_copy_(0, self._slots, torch.cat([own_out, own_lse], dim=-1))
        merged = self._merged(buffer).index_select(0, self._slots).to(out.dtype)
        return out.index_copy(0, mine, merged)

    def join(self, layers: int) -> None:
        """A step this group runs nothing of: take part in each of the stage's `layers`
        merges with neutral partials only."""
        for _ in range(layers if self.rows else 0):
            self._gather(self._neutral())

    def _neutral(self) -> torch.Tensor:
        buffer = torch.zeros(
            self.rows, self.heads, self.head_dim + 1, dtype=torch.float32, device=self.device
        )
        buffer[..., -1] = float("-inf")
        return buffer

    def _gather(self, packed: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(packed) for _ in range(self.size)]
        dist.all_gather(parts, packed, group=self.group)
        return parts

    def _merged(self, packed: torch.Tensor) -> torch.Tensor:
        parts = self._gather(packed)
        outs = [p[..., :-1] for p in parts]
        lses = [p[..., -1] for p in parts]
        merged, _ = merge_attention_partials(outs, lses)
        return merged
