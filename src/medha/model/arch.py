"""What a Llama-family checkpoint looks like: shapes and numerics read from an HF config.json.

Pure Python (no torch): the cost model and the simulator describe Llama-3-70B with the same
object the model runner is built from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medha.errors import ModelLoadError, UnsupportedModelError

# Every architecture here is the same decoder: RMSNorm, RoPE, GQA, SwiGLU. They differ only in
# defaults (Qwen2 has q/k/v bias, Qwen3 an RMSNorm of each query and key head) and in names,
# which from_hf_config normalises.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
    qk_norm: bool = False
    """Each query and key head is RMS-normalised (over head_dim, before RoPE) by the layer's
    `q_norm`/`k_norm` weights (Qwen3)."""

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        for name in (*sizes, "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sliding_window is not None and not self.sliding_window > 0:
            raise ValueError(f"sliding_window must be > 0 or null, got {self.sliding_window}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a finite number > 0, got {self.rope_theta}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ValueError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")
        if any(token < 0 for token in self.eos_token_ids):
            raise ValueError(f"eos_token_id must be ids >= 0, got {list(self.eos_token_ids)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
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
        if self.rope_type == "yarn" and self.rope_scaling is not None:
            # YaRN stretches the length the model was trained at (Qwen2.5/Qwen3: 32,768 x 4),
            # whatever max_position_embeddings says; vLLM derives its max_model_len the same way.
            original = self.rope_scaling["original_max_position_embeddings"]
            length = int(original * float(self.rope_scaling["factor"]))
        if self.sliding_window is not None:
            # Up to the window, sliding-window attention is causal attention, which medha runs;
            # longer sequences would need the window's mask. So medha serves up to the window,
            # exactly, as vLLM does where its backend has no sliding window.
            length = min(length, self.sliding_window)
        return length

    @property
    def o_proj_bias(self) -> bool:
        """Llama/Mistral/Qwen3 with attention_bias put a bias on o_proj too; Qwen2 only on
        q/k/v."""
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
        if self.qk_norm:
            attn += 2 * self.head_dim
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
        """Read an HF `config.json` dict; unsupported architectures raise UnsupportedModelError,
        malformed values ModelLoadError, both naming `source`."""
        archs = config.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(name, str) for name in archs):
            raise ModelLoadError(source, f"architectures must be a list of names, got {archs!r}")
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
            rope_theta, rope_scaling = _rope(config, source)
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
                head_dim=_head_dim(config, arch, hidden, num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(config, arch),
                # Only transformers' Llama reads mlp_bias; the others have no MLP bias.
                mlp_bias=arch == "LlamaForCausalLM" and bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
                sliding_window=_sliding_window(config, arch),
                qk_norm=arch == "Qwen3ForCausalLM",
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            # OverflowError: Python's JSON reader takes Infinity (and 1e400) as a number.
            raise ModelLoadError(source, f"malformed config: {exc!r}") from exc


def _rope(config: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """The rope's base and its scaling (None: plain rope), read as transformers 5 reads them
    (PreTrainedConfig.convert_rope_params_to_dict): a non-empty `rope_scaling`, the older key,
    replaces `rope_parameters` whole; the base is that dict's `rope_theta`, else the top-level
    one, else 10000; the type is its `rope_type`, else its older `type`."""
    scaling = _mapping_or_none(config, "rope_scaling")
    parameters = _mapping_or_none(config, "rope_parameters")
    rope = dict(scaling or parameters or {})
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise UnsupportedModelError(
            source, f"rope parameters per layer type are not supported, got {sorted(rope)}"
        )
    partial = rope.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if partial is not None and float(partial) != 1.0 and rope_type != "default":
        # These architectures' plain rope ignores it (every dimension rotates), as medha's;
        # transformers' scaled ropes would rotate a part, which medha does not.
        raise UnsupportedModelError(
            source, f"partial_rotary_factor {partial!r} with {rope_type!r} rope scaling"
        )
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            source, f"rope scaling {rope_type!r} is not supported (supported: {ROPE_TYPES})"
        )
    rope["rope_type"] = rope_type
    return theta, _checked_rope_scaling(rope, str(rope_type), config)


def _head_dim(config: Mapping[str, Any], arch: str, hidden: int, num_heads: int) -> int:
    """The config's head_dim; where it has none, its architecture's default in transformers:
    Qwen3's is 128 (not hidden / heads: Qwen3-0.6B's 1024 / 16 would be 64), the others'
    hidden / heads, which null also means."""
    if "head_dim" not in config and arch == "Qwen3ForCausalLM":
        return 128
    head_dim = config.get("head_dim")
    return hidden // num_heads if head_dim is None else int(head_dim)


def _mapping_or_none(config: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = config.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{key} must be an object or null, got {value!r}")
    return value


def _attention_bias(config: Mapping[str, Any], arch: str) -> bool:
    """Whether q/k/v (and, see o_proj_bias, o_proj) have a bias, as transformers builds each
    architecture: Qwen2 always (whatever its config says), Mistral never, Llama and Qwen3 as
    their config's attention_bias says. A checkpoint's other bias tensors go unused, as there."""
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "MistralForCausalLM":
        return False
    return bool(config.get("attention_bias", False))


def _architecture_from_model_type(model_type: object) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }.get(str(model_type), str(model_type))


# What each rope type needs besides its name, as HF's rope initialisers read it.
_ROPE_PARAMETERS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}
# Optional YaRN parameters (transformers' defaults apply where they are absent or null).
_YARN_NUMBERS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _checked_rope_scaling(
    rope_scaling: dict[str, Any], rope_type: str, config: Mapping[str, Any]
) -> dict[str, Any]:
    """`rope_scaling` with its type's parameters present and numeric (KeyError/ValueError/
    TypeError otherwise, which from_hf_config reports as a malformed config)."""
    for name in _ROPE_PARAMETERS.get(rope_type, ()):
        value = float(rope_scaling[name])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"rope_scaling[{name!r}] must be a finite number > 0, got {value}")
        rope_scaling[name] = value
    if rope_type == "yarn":
        _check_yarn(rope_scaling)
    if rope_type in ("llama3", "yarn"):
        _set_original_length(rope_scaling, config)
    elif "original_max_position_embeddings" in rope_scaling:
        original = rope_scaling["original_max_position_embeddings"]
        rope_scaling["original_max_position_embeddings"] = int(original)
    return rope_scaling


def _set_original_length(rope_scaling: dict[str, Any], config: Mapping[str, Any]) -> None:
    """The length a llama3 or YaRN scaling stretches, as transformers fills it in: a top-level
    original_max_position_embeddings (Phi-3's place) first, else the scaling's own, else
    max_position_embeddings."""
    original = config.get("original_max_position_embeddings")
    if original is None:
        original = rope_scaling.get("original_max_position_embeddings")
    if original is None:
        original = config.get("max_position_embeddings", 4096)
    if not int(original) > 0:
        raise ValueError(f"original_max_position_embeddings must be > 0, got {original}")
    rope_scaling["original_max_position_embeddings"] = int(original)


def _check_yarn(rope_scaling: dict[str, Any]) -> None:
    """YaRN's optional parameters read as numbers."""
    for name in _YARN_NUMBERS:
        if rope_scaling.get(name) is not None:
            value = float(rope_scaling[name])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"rope_scaling[{name!r}] must be >= 0, got {value}")
            rope_scaling[name] = value
    if not isinstance(rope_scaling.get("truncate", True), bool | None):  # null: false, in HF
        raise ValueError(
            f"rope_scaling['truncate'] must be a bool, got {rope_scaling['truncate']!r}"
        )


def _sliding_window(config: Mapping[str, Any], arch: str) -> int | None:
    """The attention window some layer uses, or None (see ModelArch.sliding_window)."""
    # Mistral's config class defaults the window to 4096 (null turns it off); Qwen2's too,
    # but its use_sliding_window defaults to off.
    window = config.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)
    if window is None:
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None:  # transformers >= 4.53 names each layer's attention
        return int(window) if "sliding_attention" in layer_types else None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not config.get("use_sliding_window"):
        return None  # Qwen saves a window even when it is off
    # On, without layer_types: transformers has read max_window_layers both ways over its
    # versions (the layers below it slide, or those from it on), and vLLM slides every layer.
    # The cap is exact under any reading.
    return int(window)
