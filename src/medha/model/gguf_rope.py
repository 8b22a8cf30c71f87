"""A GGUF's rope scaling, as HF config.json's `rope_parameters`.

transformers' GGUF loader reads only the rope base, so without this a converted model would
run with unscaled RoPE, silently wrong. llama.cpp keeps the scaling in two places:

- the metadata `{arch}.rope.scaling.type` (`linear`, `yarn`) with `.factor` and, for YaRN,
  `.original_context_length` (Qwen2.5 and Qwen3 past 32K tokens);
- a `rope_freqs.weight` tensor of per-frequency divisors: how its converter writes Llama 3.1's
  `llama3` scaling, whose parameters the metadata does not hold. They are read back from the
  divisors, and the scaling they give is checked to reproduce every divisor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medha.errors import UnsupportedModelError

ROPE_FREQS_TENSOR = "rope_freqs.weight"

# The parameters llama.cpp's converter falls back to for a `llama3` scaling (Llama 3.1-3.3's).
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original": 8192}
# Metadata of YaRN variants medha does not implement (DeepSeek's log multiplier and the like).
_UNREAD_YARN_KEYS = ("yarn_ext_factor", "yarn_attn_factor", "yarn_log_multiplier")
_DIVISOR_RTOL = 1e-4


def gguf_rope_scaling(
    gguf_path: Path, reader: Any, architecture: str, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """The rope scaling of the GGUF `reader` reads (a `rope_parameters` dict without the
    theta), or None; UnsupportedModelError for a scaling medha cannot reproduce."""
    fields = reader.fields
    prefix = f"{architecture}.rope.scaling."

    def field(name: str) -> Any:
        found = fields.get(prefix + name)
        return None if found is None else found.contents()

    kind = field("type")
    factor = field("factor")
    legacy_linear = fields.get(f"{architecture}.rope.scale_linear")
    if kind is None and legacy_linear is not None:  # older llama.cpp files
        kind, factor = "linear", legacy_linear.contents()
    divisors = _rope_freqs(reader)
    if divisors is not None:
        if kind not in (None, "none"):
            raise UnsupportedModelError(
                gguf_path, f"both a {kind!r} rope scaling and a {ROPE_FREQS_TENSOR} tensor"
            )
        return _llama3_from_divisors(gguf_path, divisors, head_dim, theta)
    if kind in (None, "none") or (kind == "linear" and factor == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        if unread := [name for name in _UNREAD_YARN_KEYS if field(name)]:
            raise UnsupportedModelError(
                gguf_path, f"YaRN with {', '.join(unread)} is not supported"
            )
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if (original := field("original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for name in ("beta_fast", "beta_slow"):
            if (value := field(f"yarn_{name}")) is not None:
                scaling[name] = float(value)
        return scaling
    raise UnsupportedModelError(
        gguf_path, f"rope scaling {kind!r} is not supported (supported: linear, yarn, llama3)"
    )


def _rope_freqs(reader: Any) -> np.ndarray | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            return np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    return None


def _llama3_from_divisors(
    gguf_path: Path, divisors: np.ndarray, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """The `llama3` scaling whose inverse frequencies are theta's divided by `divisors`.

    Llama 3's divisor is 1 for short wavelengths, `factor` for long ones and, between,
    1 / ((1 - s) / factor + s) with s = (original / wavelength - low) / (high - low): s is
    linear in the frequency, and the scaling depends on (original, low, high) only through
    that line. llama.cpp's defaults (Llama 3.x's own) are tried first; else, where two or more
    divisors lie between, low is taken as 1 and the others fitted to the line and rounded.
    Either is taken only if it reproduces every divisor."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if divisors.shape != inv_freq.shape:
        raise UnsupportedModelError(
            gguf_path,
            f"{ROPE_FREQS_TENSOR} has {divisors.size} values, expected {inv_freq.size}",
        )
    factor = float(divisors.max())
    if np.all(np.abs(divisors - 1.0) <= _DIVISOR_RTOL):
        return None  # all ones: no scaling
    # llama.cpp's defaults (every Llama 3.x's values) first: where they fit, they are exact.
    candidates = [_LLAMA3_DEFAULTS]
    between = (divisors > 1.0 + _DIVISOR_RTOL) & (divisors < factor * (1 - _DIVISOR_RTOL))
    if between.sum() >= 2 and factor > 1:
        share = (1.0 / divisors[between] - 1.0 / factor) / (1.0 - 1.0 / factor)  # s
        slope, intercept = np.polyfit(inv_freq[between], share, 1)
        if intercept < 0 < slope:
            high = 1.0 - 1.0 / intercept
            original = slope * 2 * math.pi * (high - 1.0)
            candidates.append({"low_freq_factor": 1.0, "high_freq_factor": round(high, 6),
                               "original": round(original)})  # fmt: skip
    for candidate in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": float(candidate["low_freq_factor"]),
            "high_freq_factor": float(candidate["high_freq_factor"]),
            "original_max_position_embeddings": int(candidate["original"]),
        }
        if np.allclose(_llama3_divisors(inv_freq, scaling), divisors, rtol=_DIVISOR_RTOL, atol=0):
            return scaling
    raise UnsupportedModelError(
        gguf_path, f"{ROPE_FREQS_TENSOR} holds no llama3 rope scaling medha can reproduce"
    )


def _llama3_divisors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for `scaling`."""
    factor, low = scaling["factor"], scaling["low_freq_factor"]
    high, original = scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength > original / low, factor, between)
    return np.where(wavelength < original / high, 1.0, divisors)
