"""What a Llama-family checkpoint looks like: shapes and numerics read from an HF config.json.

Pure Python (no torch): the cost model and the simulator describe Llama-3-70B with the same
object the model runner is built from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medha.errors import ModelLoadError, UnsupportedModelError

# Every architecture here is the same decoder: RMSNorm, RoPE, GQA, SwiGLU. They differ only in
# defaults (Qwen2 has q/k/v bias) and in names, which from_hf_config normalises.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArch:
    """Shapes and numerics of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" in ROPE_TYPES and that type's parameters ("factor", ...).
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    sliding_window: int | None = None
    """Keys a query sees when some layer attends within a window (Mistral v0.1, Qwen2 with
    use_sliding_window); None when every layer attends to the whole sequence."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                "config.json",
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}",
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def context_len(self) -> int:
        """The longest sequence the model is made for: max_position_embeddings, times the factor
        of a linear RoPE scaling (whose configs give the unscaled length; vLLM reads them the
        same way). Llama 3.1's scaling is already counted in max_position_embeddings."""
        length = self.max_position_embeddings
        if self.rope_type == "linear" and self.rope_scaling is not None:
            length = int(length * float(self.rope_scaling["factor"]))
        if self.sliding_window is not None:
            # Up to the window, sliding-window attention is causal attention, which medha runs;
            # longer sequences would need the window's mask. So medha serves up to the window,
            # exactly, as vLLM does where its backend has no sliding window.
            length = min(length, self.sliding_window)
        return length

    @property
    def o_proj_bias(self) -> bool:
        """Llama/Mistral with attention_bias put a bias on o_proj too; Qwen2 only on q/k/v."""
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **changes: Any) -> ModelArch:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelArch:
        """Read an HF `config.json` dict; unsupported architectures raise UnsupportedModelError."""
        archs = config.get("architectures") or []
        arch = archs[0] if archs else _architecture_from_model_type(config.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                source,
                f"architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            )
        try:
            hidden = int(config["hidden_size"])
            num_heads = int(config["num_attention_heads"])
            rope_scaling = config.get("rope_scaling")
            # transformers >= 5 moved rope_theta into "rope_parameters".
            rope_params = config.get("rope_parameters") or {}
            rope_theta = float(config.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
            if rope_scaling and rope_type not in ROPE_TYPES:
                raise UnsupportedModelError(
                    source, f"rope scaling {rope_type!r} is not supported (supported: {ROPE_TYPES})"
                )
            if rope_type == "default":
                rope_scaling = None
            if rope_scaling:
                rope_scaling = _checked_rope_scaling(dict(rope_scaling), str(rope_type))
            activation = config.get("hidden_act", "silu")
            if activation not in ("silu", "swish"):
                raise UnsupportedModelError(
                    source, f"hidden_act {activation!r} is not supported (supported: silu)"
                )
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias and no "attention_bias" key.
                attention_bias=bool(config.get("attention_bias", arch == "Qwen2ForCausalLM")),
                mlp_bias=bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
                sliding_window=_sliding_window(config, arch),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(source, f"malformed config: {exc!r}") from exc


def _architecture_from_model_type(model_type: object) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }.get(str(model_type), str(model_type))


# What each rope type needs besides its name, as HF's rope initialisers read it.
_ROPE_PARAMETERS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _checked_rope_scaling(rope_scaling: dict[str, Any], rope_type: str) -> dict[str, Any]:
    """`rope_scaling` with its type's parameters present and numeric (KeyError/ValueError/
    TypeError otherwise, which from_hf_config reports as a malformed config)."""
    for name in _ROPE_PARAMETERS.get(rope_type, ()):
        value = float(rope_scaling[name])
        if not value > 0:
            raise ValueError(f"rope_scaling[{name!r}] must be > 0, got {value}")
        rope_scaling[name] = value
    if "original_max_position_embeddings" in rope_scaling:
        original = rope_scaling["original_max_position_embeddings"]
        rope_scaling["original_max_position_embeddings"] = int(original)
    return rope_scaling


def _sliding_window(config: Mapping[str, Any], arch: str) -> int | None:
    """The attention window some layer uses, or None (see ModelArch.sliding_window)."""
    window = config.get("sliding_window")
    if window is None:
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None:  # transformers >= 4.53 names each layer's attention
        return int(window) if "sliding_attention" in layer_types else None
    if arch == "Qwen2ForCausalLM" and not config.get("use_sliding_window", False):
        return None  # Qwen2 saves a window even when it is off
    # On, without layer_types: transformers has read max_window_layers both ways over its
    # versions (the layers below it slide, or those from it on), and vLLM slides every layer.
    # The cap is exact under any reading.
    return int(window)
