"""Tiny random-weight HF transformers models, built offline from configs, as ground truth.

The variants cover what medha's decoder must reproduce: Llama-3-style GQA with llama3 rope
scaling, Qwen2-style q/k/v bias, Qwen3's per-head q/k norms (with YaRN rope scaling and a
head_dim other than hidden/heads), Llama with every bias (o_proj and MLP too, multi-query), and
tied embeddings as in SmolLM2 (plus linear rope scaling).
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from medha.model.arch import ModelArch
from medha.model.llama import LlamaForCausalLM as MedhaLlama
from medha.model.runner import load_model

VOCAB = 384

# A larger init than HF's default 0.02 spreads the logits, so greedy argmax has clear winners and
# float-rounding differences cannot flip a token.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    max_position_embeddings=1024,
    initializer_range=0.15,
    rms_norm_eps=1e-5,
    # No eos: HF generate must run the full length without suppressing any token (with an eos
    # and min_new_tokens it bans eos, which plain greedy decoding may rightly pick).
    eos_token_id=None,
)

VARIANTS: dict[str, tuple[type, type, dict[str, object]]] = {
    "llama3-gqa": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-bias": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0),
    ),
    "qwen3-yarn": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            rope_theta=1000000.0,
            # As Qwen's model cards say to enable 4x the trained context. The original length
            # is short, so that the ramp between extrapolated and interpolated dimensions
            # falls inside this head_dim.
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
    ),
    "llama-biases": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    ),
    "tied-smollm2": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
}


@cache
def hf_model(variant: str) -> torch.nn.Module:
    config_cls, model_cls, extra = VARIANTS[variant]
    config = config_cls(**_COMMON, **extra)
    torch.manual_seed(1234)
    model = model_cls(config).eval()
    # HF initialises norms to ones and biases to zeros: randomise them too, or a wrong norm or
    # a missing bias would go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def hf_arch(variant: str) -> ModelArch:
    config = hf_model(variant).config.to_dict()
    config.setdefault("architectures", [type(hf_model(variant)).__name__])
    return ModelArch.from_hf_config(config)


@cache
def medha_model(variant: str) -> MedhaLlama:
    state = hf_model(variant).state_dict()
    return load_model(hf_arch(variant), lambda name, dtype: state[name].to(dtype))


def hf_logits(variant: str, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(variant)(torch.tensor([ids])).logits[0].float()


def hf_greedy(variant: str, ids: list[int], new_tokens: int) -> list[int]:
    return greedy_continuation(hf_model(variant), ids, new_tokens)


def greedy_continuation(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """HF `generate`'s greedy tokens after `ids` (no padding, no early stop)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
