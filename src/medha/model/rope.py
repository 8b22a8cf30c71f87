"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Inverse frequencies are computed exactly as HF transformers does (fp32), so positions rotate to
bit-identical angles; cos/sin are computed per step for the positions in the batch (a cache for a
million positions would cost more memory than it saves time). YaRN also scales cos and sin (its
"attention factor"), which scales every attention logit by its square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from medha.model.arch import ModelArch


def inverse_frequencies(arch: ModelArch) -> torch.Tensor:
    dim = arch.head_dim
    inv_freq = 1.0 / (
        arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = dict(arch.rope_scaling or {})
    rope_type = arch.rope_type
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_scaled(arch.rope_theta, dim, scaling)
    return inv_freq


def attention_factor(arch: ModelArch) -> float:
    """What cos and sin are multiplied by: 1, or YaRN's factor (given, or from the paper's
    0.1 ln(s) + 1, with DeepSeek's mscale/mscale_all_dim where the config has both)."""
    if arch.rope_type != "yarn":
        return 1.0
    scaling = dict(arch.rope_scaling or {})
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_scaled(base: float, dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): dimensions that turn many times over the original context keep
    their frequency (extrapolation), those that turn less than once are divided by `factor`
    (interpolation), with a linear ramp between; transformers' arithmetic, step for step."""
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32  # `or`: a null or 0 means the default, as in HF
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The dimension that turns `rotations` times over the original context."""
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no ramp of zero width
    # On the CPU whatever the default device (a model is built on "meta", then loaded).
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)
    ramp = ramp.clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_share = 1 - ramp
    return interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are stretched by `factor`,
    short ones kept, the band between interpolated smoothly."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for arbitrary absolute positions, and their application to q and k."""

    def __init__(self, arch: ModelArch) -> None:
        self.inv_freq = inverse_frequencies(arch)
        self.attention_factor = attention_factor(arch)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, 1, head_dim], broadcastable over heads."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:  # scaled in fp32 before the cast, as HF does
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def rotation(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """The rotation of the tokens at `positions`, computed once per step for every layer."""
        cos, sin = self.cos_sin(positions, dtype)
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin = swap_halves(x) * [-sin_1, sin_2]: the sign moves into sin once
        # per step, exactly (negation is exact), instead of into x at every layer.
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return Rotation(cos, signed_sin)


@dataclass(frozen=True)
class Rotation:
    """Rotary embedding of one step's tokens: cos and the half-negated sin, [T, 1, head_dim]."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated as `apply_rotary` does (q and k heads may be rotated in one call)."""
        swapped = x.roll(x.shape[-1] // 2, dims=-1)  # [x_2, x_1]
        return torch.addcmul(x * self.cos, swapped, self.signed_sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the "rotate half" convention of HF Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
