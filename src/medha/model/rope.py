"""Rotary position embeddings with the scalings Llama-family checkpoints use.

Inverse frequencies are computed exactly as HF transformers does (fp32), so positions rotate to
bit-identical angles; cos/sin are computed per step for the positions in the batch (a cache for a
million positions would cost more memory than it saves time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    return inv_freq


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

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, 1, head_dim], broadcastable over heads."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)

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
