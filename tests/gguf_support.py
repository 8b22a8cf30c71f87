"""Tiny GGUF files written from HF folders the way llama.cpp's converter writes them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script interleaves the rotary halves of each Q/K head; do the same."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    hf_folder: Path,
    gguf_path: Path,
    architecture: str = "llama",
    metadata: Mapping[str, str | float | int] | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write the HF checkpoint in `hf_folder` as an F32 GGUF of `architecture`, the way
    llama.cpp would (q/k rows permuted for llama only), with extra `metadata` (keys without
    the architecture's prefix; the value's type picks the GGUF type) and extra `tensors`."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_folder / "config.json").read_text())
    tokenizer = json.loads((hf_folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(gguf_path), architecture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    for key, value in (metadata or {}).items():
        name = f"{architecture}.{key}"
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_uint32(name, value)

    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {added["content"] for added in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    )
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"][0])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer_config["chat_template"])

    weights = load_file(str(hf_folder / "model.safetensors"))
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    for name, tensor in (tensors or {}).items():
        writer.add_tensor(name, tensor)
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                tensor = weights.get(f"model.layers.{layer}.{hf_name}.{kind}")
                if tensor is None:
                    continue
                if architecture == "llama" and gguf_name in ("attn_q", "attn_k"):
                    tensor = _llama_cpp_permute(
                        tensor, heads if gguf_name == "attn_q" else kv_heads
                    )
                writer.add_tensor(f"blk.{layer}.{gguf_name}.{kind}", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_with(
    hf_config: dict[str, Any], root: Path, architecture: str, **extra: Any
) -> tuple[Path, Path]:
    """(an HF folder of random weights for `hf_config`, the GGUF written from it)."""
    from medha.model.presets import write_random_checkpoint

    hf_folder = write_random_checkpoint(root / "hf", hf_config, seed=5)
    gguf_path = root / "gguf" / "model.F32.gguf"
    gguf_path.parent.mkdir(parents=True)
    write_tiny_gguf(hf_folder, gguf_path, architecture, **extra)
    return hf_folder, gguf_path
