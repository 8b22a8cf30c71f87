"""Model shapes the cost model and the simulator know by name.

Presets carry shapes only (what costs time); token ids and RoPE details come from a real
checkpoint's config.json via `ModelArch.from_hf_config` when one is loaded. Any ModelArch works
with the cost model; these are the ones the paper's experiments (and our CPU demo) use.
"""

from __future__ import annotations

from medha.model.arch import ModelArch

LLAMA_3_8B = ModelArch(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    torch_dtype="bfloat16",
)

LLAMA_3_70B = ModelArch(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    torch_dtype="bfloat16",
)

SMOLLM2_135M = ModelArch(
    architecture="LlamaForCausalLM",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)

MODEL_PRESETS: dict[str, ModelArch] = {
    "llama-3-8b": LLAMA_3_8B,
    "llama-3-70b": LLAMA_3_70B,
    "smollm2-135m": SMOLLM2_135M,
}


def model_preset(name: str) -> ModelArch:
    """A preset by name ('llama-3-8b', 'llama-3-70b', 'smollm2-135m'); case-insensitive."""
    try:
        return MODEL_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r} (known: {', '.join(MODEL_PRESETS)})"
        ) from None
