"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names are Hugging Face's, so a checkpoint's tensors load by name. Projections are
not stacked (q/k/v, gate/up) as GPU servers do: on CPU the stacked matmuls measured 2.5% slower
in prefill and no faster in decode, and separate weights shard by name for tensor parallelism.
Each forward
runs a flat, ragged batch of tokens: prefill chunks and decodes of many sequences together,
described by one AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medha.kernels import AttentionFn, AttentionMetadata, write_kv
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.rope import RotaryEmbedding, apply_rotary

# Combines this shard's attention partial with the other KVP groups' (identity without KVP).
PartialCombiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as HF does (matters for bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, device: torch.device | str | None = None) -> None:
        super().__init__()
        h, i, bias = arch.hidden_size, arch.intermediate_size, arch.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias, device=device)
        self.up_proj = nn.Linear(h, i, bias=bias, device=device)
        self.down_proj = nn.Linear(i, h, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        combine: PartialCombiner | None,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = kv_cache.layer(self.layer_index)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out, lse = attention(q, k_cache, v_cache, meta, self.scale)
        if combine is not None:
            out = combine(out, lse)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


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
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        attention: AttentionFn,
        combine: PartialCombiner | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(
            self.input_layernorm(x), cos, sin, kv_cache, meta, attention, combine
        )
        return x + self.mlp(self.post_attention_layernorm(x))


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
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, kv_cache, meta, attention, combine)
        if logits_indices is not None:
            # Norm and LM head only where a token is sampled: the LM head is the largest matmul
            # of a small model's prefill.
            x = x.index_select(0, logits_indices)
        return self.lm_head(self.model.norm(x)).float()
