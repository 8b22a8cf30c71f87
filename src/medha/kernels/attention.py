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
# Availability when asked for by name, where it differs (Triton's CPU interpreter, for tests).
_NAMED_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {}
_REQUIREMENT: dict[str, str] = {}
# Best first. A GPU backend registers itself in front of "sdpa".
_PREFERENCE: list[str] = ["sdpa", "reference"]


def register_backend(
    name: str,
    fn: AttentionFn,
    available: Callable[[torch.device], bool],
    *,
    preferred: bool = False,
    available_by_name: Callable[[torch.device], bool] | None = None,
    requirement: str = "",
) -> None:
    """Add an attention backend; `preferred` puts it first in automatic selection.

    `available_by_name`, if given, replaces `available` when the backend is named explicitly;
    `requirement` says what the backend needs, for the error when it is not available.
    """
    _BACKENDS[name] = fn
    _AVAILABLE[name] = available
    if available_by_name is not None:
        _NAMED_AVAILABLE[name] = available_by_name
    if requirement:
        _REQUIREMENT[name] = requirement
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
        if not _NAMED_AVAILABLE.get(name, _AVAILABLE[name])(device):
            need = f": {_REQUIREMENT[name]}" if name in _REQUIREMENT else ""
            raise ValueError(f"attention backend {name!r} is not available on {device}{need}")
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
    keys (see `write_kv`), in any memory order whose head_dim is contiguous and whose block and
    token dims merge (`new_kv_pool`'s head-major one, or plain contiguous); returns out
    [T, Hq, D] in q's dtype and lse [T, Hq] in fp32.
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
    _store(k, v, k_cache, v_cache, *_stored_slots(slot_mapping))


def write_step_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    """`write_kv` at `meta.slot_mapping`, with the stored tokens picked once per step (cached in
    the metadata) rather than once per layer."""
    stored = meta.scratch.get("stored_slots")
    if stored is None:
        stored = meta.scratch["stored_slots"] = _stored_slots(meta.slot_mapping)
    _store(k, v, k_cache, v_cache, *stored)


def _stored_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(slots stored in this shard, mask of their tokens or None when all are stored)."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return slot_mapping, None
    return slot_mapping[keep], keep


def _store(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    if slots.numel() == 0:
        return
    if keep is not None:
        k, v = k[keep], v[keep]
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
