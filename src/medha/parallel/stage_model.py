"""One worker's part of the model: the layers of its pipeline stage, sharded for its TP rank.

The modules are the single-process model's own (DecoderLayer, RMSNorm, PackedProjection), built
with the TP rank's local shapes and loaded with its slices of the checkpoint; the differences
live at the edges: stage 0 embeds (vocab-parallel), other stages take hidden states, the last
stage applies the final norm and the vocab-parallel LM head. Parameter names are HF's, so each
tensor is read from the checkpoint by name and only this rank's slice of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medha.kernels import AttentionFn, AttentionMetadata
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.llama import DecoderLayer, PartialCombiner, RMSNorm, layer_projections
from medha.model.projections import PackedProjection, pack_in_read_order
from medha.model.rope import RotaryEmbedding
from medha.parallel.tp import (
    RowParallel,
    TpShard,
    gather_vocab,
    load_sharded,
    local_arch,
    vocab_parallel_embed,
)


class _Body(nn.Module):
    """Holds HF's `model.*` names: embed_tokens (stage 0), layers.{i}, norm (last stage)."""

    def __init__(self, arch: ModelArch, layers: range, first: bool, last: bool, vocab: int) -> None:
        super().__init__()
        if first:
            self.embed_tokens = nn.Embedding(vocab, arch.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(arch, i) for i in layers})
        if last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class StageModel(nn.Module):
    def __init__(
        self, arch: ModelArch, layers: range, first: bool, last: bool, tp_rank: int, tp: int
    ) -> None:
        super().__init__()
        self.full_arch = arch
        self.arch = local_arch(arch, tp)
        self.shard = TpShard(tp_rank, tp, arch)
        self.first, self.last, self.tp = first, last, tp
        self.layer_range = layers
        self.model = _Body(self.arch, layers, first, last, self.shard.vocab_shard)
        if last:
            self.lm_head = nn.Linear(arch.hidden_size, self.shard.vocab_shard, bias=False)
            self.logits = PackedProjection([self.lm_head])
        self.rotary = RotaryEmbedding(arch)
        self.tp_group: Any = None

    @classmethod
    def load(
        cls,
        checkpoint: Any,
        layers: range,
        first: bool,
        last: bool,
        tp_rank: int,
        tp: int,
        tp_group: Any,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> StageModel:
        arch = checkpoint.arch
        with torch.device("meta"):
            stage = cls(arch, layers, first, last, tp_rank, tp)
        stage = stage.to(dtype=dtype).to_empty(device=device)
        # Pack first, then load into the packed buffers (as medha.model.runner.load_model does).
        head = [stage.logits] if last else []
        pack_in_read_order([*layer_projections(stage.model.layers.values()), *head], copy=False)
        load_sharded(stage, stage.shard, checkpoint, dtype, arch.tie_word_embeddings)
        stage.tp_group = tp_group
        if tp > 1:
            for layer in stage.model.layers.values():
                layer.self_attn.out = RowParallel(layer.self_attn.out, tp_group)
                layer.mlp.down = RowParallel(layer.mlp.down, tp_group)
        return stage.eval()

    @torch.inference_mode()
    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        combine: PartialCombiner | None = None,
        logit_rows: torch.Tensor | None = None,
        *,
        keep_hidden: bool = False,
    ) -> torch.Tensor:
        """inputs: token ids [T] (stage 0) or hidden states [T, hidden]. Returns hidden states
        [T, hidden], or on the last stage fp32 logits [rows, vocab] (every TP rank the same)
        unless `keep_hidden` (then its final hidden states, for `head`)."""
        if self.first:
            group = self.tp_group if self.tp > 1 else None
            x = vocab_parallel_embed(
                inputs, self.model.embed_tokens.weight, self.shard.vocab_range, group
            )
        else:
            x = inputs
        rotation = self.rotary.rotation(positions, x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, rotation, kv_cache, meta, attention, combine)
        if not self.last or keep_hidden:
            return x
        if logit_rows is not None:
            x = x.index_select(0, logit_rows)
        return self.head(x)

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of the last stage's hidden states [rows, hidden]: fp32 logits
        [rows, vocab], the same on every TP rank (each rank of the TP group must call it)."""
        local = self.logits(self.model.norm(x)).float()
        return gather_vocab(local, self.full_arch.vocab_size, self.tp, self.tp_group)
