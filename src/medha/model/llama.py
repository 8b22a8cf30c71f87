"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV cache.

Parameter names are Hugging Face's, so a checkpoint's tensors load by name. Projections that
share an input (q/k/v, gate/up) run as one matmul over one packed buffer (`pack_weights`, see
`medha.model.projections`), the HF-named weights being views of it. Each forward runs a flat,
ragged batch of tokens: prefill chunks and decodes of many sequences together, described by one
AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from medha.kernels import AttentionFn, AttentionMetadata
from medha.kernels.attention import write_step_kv
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.projections import PackedProjection, pack_in_read_order
from medha.model.rope import RotaryEmbedding, Rotation

# Combines this shard's attention partial with the other KVP groups' (identity without KVP).
PartialCombiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op instead of six; bitwise equal to HF's formula in fp32 (checked on CPU
            # over hidden sizes 64-4096, 1-1000 rows, 1 and 2 threads).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Otherwise normalise in fp32 and cast back before the weight, exactly as HF does
        # (F.rms_norm would apply the weight before the cast).
        x32 = x.float()
        normed = x32 * (x32 * x32).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, device: torch.device | str | None = None) -> None:
        super().__init__()
        h, i, bias = arch.hidden_size, arch.intermediate_size, arch.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias, device=device)
        self.up_proj = nn.Linear(h, i, bias=bias, device=device)
        self.down_proj = nn.Linear(i, h, bias=bias, device=device)
        self.intermediate_size = i
        self.gate_up = PackedProjection([self.gate_proj, self.up_proj])
        self.down = PackedProjection([self.down_proj])

    @property
    def projections(self) -> tuple[PackedProjection, ...]:
        """In the order forward reads them."""
        return (self.gate_up, self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class Attention(nn.Module):
    def __init__(
        self, arch: ModelArch, layer_index: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.scale = d**-0.5
        bias = arch.attention_bias
        self.q_proj = nn.Linear(h, arch.num_heads * d, bias=bias, device=device)
        self.k_proj = nn.Linear(h, arch.num_kv_heads * d, bias=bias, device=device)
        self.v_proj = nn.Linear(h, arch.num_kv_heads * d, bias=bias, device=device)
        self.o_proj = nn.Linear(arch.num_heads * d, h, bias=arch.o_proj_bias, device=device)
        self.qkv = PackedProjection([self.q_proj, self.k_proj, self.v_proj])
        self.out = PackedProjection([self.o_proj])
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps, device)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps, device)

    @property
    def projections(self) -> tuple[PackedProjection, ...]:
        """In the order forward reads them."""
        return (self.qkv, self.out)

    def forward(
        self,
        x: torch.Tensor,
        rotation: Rotation,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        combine: PartialCombiner | None,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x).split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
        qk = qk.view(tokens, heads + kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([heads, kv_heads], 1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), 1)
        # q and k heads are rotated together: one rotation per layer, not two.
        q, k = rotation.apply(qk).split([heads, kv_heads], 1)
        v = v.view(tokens, kv_heads, d)
        k_cache, v_cache = kv_cache.layer(self.layer_index)
        write_step_kv(k, v, k_cache, v_cache, meta)
        out, lse = attention(q, k_cache, v_cache, meta, self.scale)
        if combine is not None:
            out = combine(out, lse)
        return self.out(out.reshape(tokens, heads * d))


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArch, layer_index: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer_index, device)
        self.mlp = MLP(arch, device)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device)

    def forward(
        self,
        x: torch.Tensor,
        rotation: Rotation,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        combine: PartialCombiner | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(
            self.input_layernorm(x), rotation, kv_cache, meta, attention, combine
        )
        return x + self.mlp(self.post_attention_layernorm(x))


def layer_projections(layers: Iterable[nn.Module]) -> list[PackedProjection]:
    """The packed projections of `layers` (DecoderLayers), in the order a step reads them. For
    packing: call it before a tensor-parallel stage wraps projections (RowParallel)."""
    return [
        projection
        for layer in layers
        for projection in (*layer.self_attn.projections, *layer.mlp.projections)
    ]


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers of `layers` (all by default: a pipeline stage holds a
    range) and the final norm."""

    def __init__(
        self, arch: ModelArch, layers: range | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.arch = arch
        self.layer_range = layers if layers is not None else range(arch.num_layers)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, device=device)
        # A ModuleDict keyed by absolute layer number keeps HF's names ("layers.17.mlp...") for
        # a pipeline stage that holds layers 16-31.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(arch, i, device) for i in self.layer_range}
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, device)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, device=device)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False, device=device)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(arch)
        self.logits = PackedProjection([self.lm_head])

    def pack_weights(self, copy: bool = True) -> None:
        """Lay the projections out for fast matmuls (see `medha.model.projections`); with
        `copy=False` the weights are left uninitialised, to be loaded into afterwards. Run it
        after any move of the model to another device or dtype."""
        pack_in_read_order([*layer_projections(self.model.layers.values()), self.logits], copy)
        if self.arch.tie_word_embeddings:
            # The embedding reads rows of the packed LM head ([in, vocab] storage): one strided
            # row per token, and no second copy of the largest matrix.
            self.model.embed_tokens.weight = self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        logits_indices: torch.Tensor | None = None,
        combine: PartialCombiner | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> logits [len(logits_indices) or T, vocab] in fp32."""
        x = self.model.embed_tokens(input_ids)
        rotation = self.rotary.rotation(positions, x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, rotation, kv_cache, meta, attention, combine)
        return self.head(x, logits_indices)

    def head(self, x: torch.Tensor, logits_indices: torch.Tensor | None) -> torch.Tensor:
        """Final norm and LM head (also the end of a step run layer by layer)."""
        if logits_indices is not None:
            # Norm and LM head only where a token is sampled: the LM head is the largest matmul
            # of a small model's prefill.
            x = x.index_select(0, logits_indices)
        return self.logits(self.model.norm(x)).float()
