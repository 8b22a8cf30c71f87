"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names are Hugging Face's, except that q/k/v and gate/up are stacked into one matmul
each (`hf_sources` maps a parameter to the checkpoint tensors it is made of). Each forward
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


# Stacked parameters and the HF tensors they concatenate (along the output dimension).
_STACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def hf_sources(param_name: str) -> tuple[str, ...]:
    """The checkpoint tensors (HF names) a parameter of this model is made of, in order."""
    for stacked, parts in _STACKED.items():
        if stacked in param_name:
            return tuple(param_name.replace(stacked, part) for part in parts)
    return (param_name,)


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
        self.intermediate = i
        # gate and up stacked into one matmul (HF's gate_proj; up_proj): one weight read and one
        # kernel launch instead of two, which is what decode speed is made of.
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias, device=device)
        self.down_proj = nn.Linear(i, h, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(
        self, arch: ModelArch, layer_index: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.scale = d**-0.5
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        # q, k and v stacked into one matmul (HF's q_proj; k_proj; v_proj), like gate/up.
        self.qkv_proj = nn.Linear(
            h, self.q_size + 2 * self.kv_size, bias=arch.attention_bias, device=device
        )
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
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
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
