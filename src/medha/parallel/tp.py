"""Tensor parallelism (Megatron-style) for the Llama decoder: which slice of each weight a TP rank
holds, and the collectives that make the sharded layer compute the same function.

- Column-parallel: q/k/v by heads and gate/up by MLP columns; each rank's slice feeds its own
  attention heads and SiLU columns, so nothing is communicated in between.
- Row-parallel: o_proj and down_proj by input columns; each rank's product is a partial sum of
  the full output, completed by one all-reduce per projection. Their biases are added once (by
  TP rank 0), not tp times.
- Vocab-parallel embedding (each rank looks up the ids in its vocabulary range, zeros elsewhere,
  then all-reduce) and LM head (each rank computes its vocabulary range, then all-gather).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medha.model.arch import ModelArch
from medha.model.projections import PackedProjection


def check_tp(arch: ModelArch, tp: int) -> None:
    """Raise ValueError naming every dimension `tp` does not divide."""
    problems = [
        f"{name}={value}"
        for name, value in (
            ("num_attention_heads", arch.num_heads),
            ("num_key_value_heads", arch.num_kv_heads),
            ("intermediate_size", arch.intermediate_size),
        )
        if value % tp
    ]
    if problems:
        raise ValueError(
            f"tp={tp} must divide {', '.join(problems)} (KV heads are split, never replicated)"
        )


def local_arch(arch: ModelArch, tp: int) -> ModelArch:
    """The shapes one TP rank's modules are built with (head_dim and hidden size unchanged)."""
    check_tp(arch, tp)
    return replace(
        arch,
        num_heads=arch.num_heads // tp,
        num_kv_heads=arch.num_kv_heads // tp,
        intermediate_size=arch.intermediate_size // tp,
    )


@dataclass(frozen=True)
class TpShard:
    """This rank's part of the model's dimensions."""

    rank: int
    size: int
    arch: ModelArch

    @property
    def vocab_shard(self) -> int:
        return -(-self.arch.vocab_size // self.size)

    @property
    def vocab_range(self) -> tuple[int, int]:
        start = min(self.rank * self.vocab_shard, self.arch.vocab_size)
        return start, min(start + self.vocab_shard, self.arch.vocab_size)

    def weight_slice(self, name: str) -> tuple[int, int, int] | str | None:
        """How parameter `name` (HF naming) is sharded: (dim, start, stop), None when every
        rank holds it whole, or "rank0" for a row-parallel bias only TP rank 0 adds."""
        a, r = self.arch, self.rank
        d = a.head_dim
        if self.size == 1:
            return None
        leaf = name.rsplit(".", 2)
        module, kind = leaf[-2], leaf[-1]
        if module == "q_proj":
            per = a.num_heads // self.size * d
            return (0, r * per, (r + 1) * per)
        if module in ("k_proj", "v_proj"):
            per = a.num_kv_heads // self.size * d
            return (0, r * per, (r + 1) * per)
        if module in ("gate_proj", "up_proj"):
            per = a.intermediate_size // self.size
            return (0, r * per, (r + 1) * per)
        if module in ("o_proj", "down_proj"):
            if kind == "bias":
                return "rank0"
            per = (a.num_heads * d if module == "o_proj" else a.intermediate_size) // self.size
            return (1, r * per, (r + 1) * per)
        if module in ("embed_tokens", "lm_head"):
            start, stop = self.vocab_range
            return (0, start, stop)
        return None


def load_sharded(
    module: nn.Module, shard: TpShard, checkpoint: Any, dtype: torch.dtype, tied: bool
) -> None:
    """Fill every parameter of `module` (HF names) with this rank's slice from `checkpoint`,
    reading only that slice from disk. Vocabulary shards are zero-padded to equal sizes so the
    all-gather of the LM head is regular."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            source = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
            how = shard.weight_slice(name)
            if how is None:
                value = checkpoint.get_tensor(source, dtype)
            elif how == "rank0":
                value = checkpoint.get_tensor(source, dtype)
                if shard.rank != 0:
                    value = torch.zeros_like(value)
            else:
                dim, start, stop = how
                value = checkpoint.get_slice(source, dim, start, stop, dtype)
            if value.shape != param.shape:
                if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                    raise ValueError(f"{name}: shard {tuple(value.shape)} != {tuple(param.shape)}")
                # The last vocabulary shard is short: pad it with zero rows (logits trimmed later).
                padded = torch.zeros(param.shape, dtype=dtype)
                padded[: value.shape[0]] = value
                value = padded
            param.copy_(value)


class RowParallel:
    """A row-parallel projection: this rank's partial product, summed over the TP group."""

    def __init__(self, projection: PackedProjection, group: Any) -> None:
        self.projection = projection
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.projection(x)
        dist.all_reduce(y, group=self.group)
        return y


def vocab_parallel_embed(
    ids: torch.Tensor, weight: torch.Tensor, vocab_range: tuple[int, int], group: Any
) -> torch.Tensor:
    """Rows of the ids this rank's vocabulary range holds, zeros for the others, summed over
    the TP group: exactly one rank contributes each row, so the sum is exact."""
    start, stop = vocab_range
    outside = (ids < start) | (ids >= stop)
    local = torch.where(outside, torch.zeros_like(ids), ids - start)
    x = F.embedding(local, weight)
    x.masked_fill_(outside.unsqueeze(-1), 0.0)
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def gather_vocab(local_logits: torch.Tensor, vocab_size: int, tp: int, group: Any) -> torch.Tensor:
    """[rows, vocab/tp] on each rank -> [rows, vocab] on every rank (all-gather, in rank order)."""
    if tp == 1:
        return local_logits[:, :vocab_size]
    parts = [torch.empty_like(local_logits) for _ in range(tp)]
    dist.all_gather(parts, local_logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[:, :vocab_size]
