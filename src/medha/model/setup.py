"""From a model name to a ready ModelRunner and its tokenizer (one request at a time), and the
pieces the engine builds one from, with a config that cannot work here reported as a typed
InvalidConfigError."""

from __future__ import annotations

import torch

from medha.errors import InvalidConfigError, KVCacheTooLargeError
from medha.model.arch import ModelArch
from medha.model.device import check_device, memory_bytes
from medha.model.kv_cache import KVCache
from medha.model.llama import LlamaForCausalLM
from medha.model.loader import Checkpoint, load_checkpoint
from medha.model.runner import ModelRunner, load_model
from medha.model.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def build_runner(
    model: str,
    *,
    max_tokens: int | None = None,
    num_blocks: int | None = None,
    block_size: int = 16,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attention_backend: str = "auto",
) -> tuple[ModelRunner, Tokenizer]:
    """Load `model` and give it a KV cache of `num_blocks`, by default enough for the model's
    whole context (`ModelArch.context_len`) plus `max_tokens`.

    A device this machine lacks, a KV cache too large for it or an attention backend it cannot
    run raise InvalidConfigError subclasses (the device before anything is loaded)."""
    torch_device = check_device(device)
    checkpoint = load_checkpoint(model)
    if num_blocks is None:
        tokens = checkpoint.arch.context_len + (max_tokens or 0)
        num_blocks = -(-tokens // block_size)
    runner = checkpoint_runner(
        checkpoint, torch_device, num_blocks, block_size, dtype, attention_backend
    )
    return runner, checkpoint.tokenizer


def checkpoint_runner(
    checkpoint: Checkpoint,
    device: torch.device,
    num_blocks: int,
    block_size: int = 16,
    dtype: str | torch.dtype = "float32",
    attention_backend: str = "auto",
) -> ModelRunner:
    """A ModelRunner of an opened checkpoint's weights with a KV cache of `num_blocks`."""
    torch_dtype = resolve_dtype(dtype)
    net = load_model(checkpoint.arch, checkpoint.get_tensor, torch_dtype, device)
    cache = new_kv_cache(checkpoint.arch, num_blocks, block_size, torch_dtype, device)
    return open_runner(net, cache, attention_backend)


def new_kv_cache(
    arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCache:
    """A KVCache of all `arch`'s layers; KVCacheTooLargeError if it cannot fit the device."""
    size = num_blocks * KVCache.bytes_per_block(arch, block_size, dtype, arch.num_layers)
    room = memory_bytes(device)
    # Checked before allocating: on CPU an oversized allocation fails with a bare RuntimeError,
    # or (overcommitted) succeeds and gets the process killed once the pages are touched.
    if room is not None and size > room:
        raise _kv_too_large(size, num_blocks, device, f"its {room / 2**30:.1f} GiB")
    try:
        return KVCache(arch, num_blocks, block_size, dtype, device)
    except torch.OutOfMemoryError as exc:
        raise _kv_too_large(size, num_blocks, device, "what is left of its memory") from exc
    except RuntimeError as exc:
        # The CPU allocator's failure (a limit the check above cannot see, as RLIMIT_AS) is a
        # plain RuntimeError; anything else is not ours to rename.
        if device.type != "cpu" or "allocate" not in str(exc):
            raise
        raise _kv_too_large(size, num_blocks, device, "what is left of its memory") from exc


def _kv_too_large(size: int, num_blocks: int, device: torch.device, room: str) -> Exception:
    return KVCacheTooLargeError(
        f"a KV cache of {size / 2**30:.1f} GiB ({num_blocks} blocks) does not fit in {device}'s "
        f"memory ({room}); lower kv_cache_gib or num_blocks"
    )


def open_runner(
    model: LlamaForCausalLM, cache: KVCache, attention_backend: str = "auto"
) -> ModelRunner:
    """ModelRunner(model, cache, attention_backend), with a backend the device cannot run (or
    one nobody registered) reported as InvalidConfigError."""
    try:
        return ModelRunner(model, cache, attention_backend)
    except ValueError as exc:  # raised only by select_backend, whose message says what it needs
        raise InvalidConfigError(str(exc)) from exc
