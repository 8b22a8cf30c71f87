"""The model runner: owns the model and its KV cache, and runs one step of a ragged batch.

A step is a list of StepSeq: for each sequence the query tokens it processes now (a prefill chunk
or one decode token), where they sit in the sequence, and the blocks its keys live in. The runner
returns the logits of the positions that sample. It never decides anything: which tokens, which
blocks, which order is the scheduler's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medha.kernels import AttentionMetadata, select_backend
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.layerwise import LayerwiseStep
from medha.model.llama import LlamaForCausalLM, PartialCombiner


@dataclass(frozen=True)
class StepSeq:
    """One sequence's share of a step."""

    token_ids: Sequence[int]
    """The query tokens processed now."""
    start_pos: int
    """Absolute position of token_ids[0] (= tokens of this sequence already in the cache)."""
    block_table: Sequence[int]
    """Blocks holding this sequence's keys in this shard, in position order (including the
    blocks the new tokens go to)."""
    sample: bool = True
    """Return logits for the last query token (False for a prefill chunk that is not the last)."""
    kv_start_pos: int = 0
    """First absolute position this shard holds (KVP: the group's range start)."""
    kv_len: int | None = None
    """Keys this shard holds for the sequence after the step; None = start_pos + len(token_ids)
    - kv_start_pos (the shard appends the new tokens)."""

    @property
    def appends(self) -> bool:
        return self.kv_len is None


def load_model(
    arch: ModelArch,
    get_tensor: Callable[[str, torch.dtype], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaForCausalLM:
    """Build the model without initialising it, lay its weights out for fast matmuls, then
    fill every parameter from `get_tensor`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    model = model.to(dtype=dtype).to_empty(device=device)
    if arch.tie_word_embeddings:
        # to_empty materialises the two names of a tied weight separately: tie them again.
        model.lm_head.weight = model.model.embed_tokens.weight
    # Packing before loading writes each tensor straight into its final layout: no transient
    # second copy of the weights.
    model.pack_weights(copy=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(get_tensor(name, dtype))
    return model.eval()


class ModelRunner:
    """Runs steps of a model over its paged KV cache."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        attention_backend: str = "auto",
    ) -> None:
        self.model = model
        self.arch: ModelArch = model.arch
        self.kv_cache = kv_cache
        self.device = kv_cache.k[0].device
        self.backend_name, self.attention = select_backend(self.device, attention_backend)

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    def step(
        self,
        seqs: Sequence[StepSeq],
        *,
        all_logits: bool = False,
        combine: PartialCombiner | None = None,
    ) -> torch.Tensor:
        """Run one step; logits (fp32) of each sampling sequence's last query token, in batch
        order, or with `all_logits` of every query token."""
        return self.start_step(seqs, all_logits=all_logits, combine=combine).run()

    @torch.inference_mode()
    def start_step(
        self,
        seqs: Sequence[StepSeq],
        *,
        all_logits: bool = False,
        combine: PartialCombiner | None = None,
    ) -> LayerwiseStep:
        """A step up to its first layer, to be run layer by layer (`LayerwiseStep.advance`):
        it may stop between layers while other steps run (see medha.model.layerwise)."""
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        ids = [token for seq in seqs for token in seq.token_ids]
        self._check_vocab(ids)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        hidden = self.model.model.embed_tokens(input_ids)
        return self._layerwise(seqs, hidden, 0, all_logits, combine)

    @torch.inference_mode()
    def split_step(
        self, step: LayerwiseStep, indices: Sequence[int]
    ) -> tuple[LayerwiseStep, LayerwiseStep]:
        """The sequences of `step` at `indices`, and the others, as two steps that go on from
        the layer where `step` stopped (e.g. to finish a paused step's decodes now and its
        prefill chunks later). Each sequence goes on as in the whole batch, up to float
        rounding (matmuls over fewer rows may round differently, as any change of batch
        does)."""
        chosen = set(indices)
        if not chosen or len(chosen) == len(step.seqs):
            raise ValueError("a split needs sequences on both sides")
        rows: tuple[list[int], list[int]] = ([], [])
        parts: tuple[list[StepSeq], list[StepSeq]] = ([], [])
        offset = 0
        for index, seq in enumerate(step.seqs):
            side = 0 if index in chosen else 1
            rows[side].extend(range(offset, offset + len(seq.token_ids)))
            parts[side].append(seq)
            offset += len(seq.token_ids)
        first, second = (
            self._layerwise(
                part,
                step.hidden.index_select(0, torch.tensor(side_rows, device=self.device)),
                step.next_layer,
                step.all_logits,
                step.combine,
            )
            for part, side_rows in zip(parts, rows, strict=True)
        )
        return first, second

    def _layerwise(
        self,
        seqs: Sequence[StepSeq],
        hidden: torch.Tensor,
        next_layer: int,
        all_logits: bool,
        combine: PartialCombiner | None,
    ) -> LayerwiseStep:
        positions: list[int] = []
        logit_rows: list[int] = []
        for seq in seqs:
            positions.extend(range(seq.start_pos, seq.start_pos + len(seq.token_ids)))
            if seq.sample:
                logit_rows.append(len(positions) - 1)
        device = self.device
        pos = torch.tensor(positions, dtype=torch.int64, device=device)
        rows = None if all_logits else torch.tensor(logit_rows, dtype=torch.int64, device=device)
        return LayerwiseStep(
            self.model,
            self.kv_cache,
            self.build_metadata(seqs),
            self.attention,
            combine,
            rows,
            hidden,
            self.model.rotary.rotation(pos, hidden.dtype),
            tuple(seqs),
            all_logits,
            next_layer,
        )

    def build_metadata(self, seqs: Sequence[StepSeq]) -> AttentionMetadata:
        kv_lens = [
            s.kv_len if s.kv_len is not None else s.start_pos + len(s.token_ids) - s.kv_start_pos
            for s in seqs
        ]
        return AttentionMetadata.build(
            q_lens=[len(s.token_ids) for s in seqs],
            q_start_pos=[s.start_pos for s in seqs],
            kv_lens=kv_lens,
            kv_start_pos=[s.kv_start_pos for s in seqs],
            block_tables=[s.block_table for s in seqs],
            block_size=self.block_size,
            appends=[s.appends for s in seqs],
            device=self.device,
        )

    def _check_vocab(self, ids: list[int]) -> None:
        vocab = self.arch.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
