"""The one attention entry point every model layer calls, and the backends behind it.

`paged_attention(q, k_cache, v_cache, meta, scale)` runs a ragged batch that mixes prefill
chunks and decodes over a paged KV cache and returns (output, lse) per query token and head.
A backend is any function with that signature; Triton and flash-attn adapters register here
under their names, and `select_backend` picks the best one available for a device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medha.kernels.metadata import AttentionMetadata
from medha.kernels.reference import reference_attention
from medha.kernels.sdpa import sdpa_attention, sdpa_available
from medha.log import get_logger

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float],
    tuple[torch.Tensor, torch.Tensor],
]

_log = get_logger(__name__)

_BACKENDS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
}
_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {
    "reference": lambda device: True,
    "sdpa": sdpa_available,
}
# Best first. A GPU backend registers itself in front of "sdpa".
_PREFERENCE: list[str] = ["sdpa", "reference"]


def register_backend(
    name: str,
    fn: AttentionFn,
    available: Callable[[torch.device], bool],
    *,
    preferred: bool = False,
) -> None:
    """Add an attention backend; `preferred` puts it first in automatic selection."""
    _BACKENDS[name] = fn
    _AVAILABLE[name] = available
    if name in _PREFERENCE:
        _PREFERENCE.remove(name)
    _PREFERENCE.insert(0 if preferred else len(_PREFERENCE) - 1, name)


def backend_names() -> list[str]:
    return list(_PREFERENCE)


def select_backend(device: torch.device | str, name: str = "auto") -> tuple[str, AttentionFn]:
    """The named backend, or with "auto" the most preferred one available on `device`."""
    device = torch.device(device)
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r} (known: {backend_names()})")
        if not _AVAILABLE[name](device):
            raise ValueError(f"attention backend {name!r} is not available on {device}")
        chosen = name
    else:
        chosen = next(n for n in _PREFERENCE if _AVAILABLE[n](device))
    _log.info("attention backend", backend=chosen, device=str(device))
    return chosen, _BACKENDS[chosen]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    backend: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a mixed prefill/decode batch over a paged cache -> (out, lse).

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] already holding this step's
    keys (see `write_kv`); returns out [T, Hq, D] in q's dtype and lse [T, Hq] in fp32.
    """
    return _BACKENDS[backend](q, k_cache, v_cache, meta, scale)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values [T, Hkv, D] at their slots; slot -1 means not stored here."""
    if slot_mapping.numel() == 0:
        return
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
