"""Open a checkpoint (preset name, HF folder or .gguf file) and validate it before any weight is read.

Validation reads only config.json, the safetensors headers and the shard index, so a broken or
mismatched checkpoint fails in milliseconds with a message naming the file, instead of deep inside
the model runner. Weights are then read lazily, one tensor (or one slice of one) at a time, so that
each tensor-parallel rank reads only its own part.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medha.errors import ModelLoadError
from medha.log import get_logger
from medha.model.arch import ModelArch
from medha.model.generation_defaults import GENERATION_CONFIG_FILE
from medha.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bytes per element of the safetensors dtypes a weight may be stored in.
_FLOAT_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ANY_DTYPE_BYTES = {
    **_FLOAT_DTYPE_BYTES,
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1},
    **{"F8_E4M3": 1, "F8_E5M2": 1},
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, as declared by its safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A validated checkpoint: its architecture, tokenizer, and lazy access to its tensors."""

    path: Path
    arch: ModelArch
    tokenizer: Tokenizer
    tensors: Mapping[str, TensorInfo] = field(repr=False)

    def tensor_names(self) -> list[str]:
        return sorted(self.tensors)

    def get_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one whole tensor from disk (optionally cast to `dtype`)."""
        from safetensors import safe_open

        with safe_open(self._info(name).file, framework="pt", device="cpu") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def get_slice(
        self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read rows/columns `[start, stop)` of one tensor along `dim`, without reading the rest."""
        from safetensors import safe_open

        info = self._info(name)
        if not -len(info.shape) <= dim < len(info.shape):
            raise ValueError(f"{name} has {len(info.shape)} dims; dim={dim} is out of range")
        dim %= len(info.shape)
        if not 0 <= start <= stop <= info.shape[dim]:
            raise ValueError(f"{name}: slice [{start}, {stop}) is outside 0..{info.shape[dim]}")
        index = (slice(None),) * dim + (slice(start, stop),)
        with safe_open(info.file, framework="pt", device="cpu") as handle:
            tensor: torch.Tensor = handle.get_slice(name)[index]
        return tensor if dtype is None else tensor.to(dtype)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None


def expected_tensor_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `arch` must hold, with its shape (HF names and layout)."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, hidden)}
    for i in range(arch.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes[f"{attn}.q_proj.weight"] = (q_out, hidden)
        shapes[f"{attn}.k_proj.weight"] = (kv_out, hidden)
        shapes[f"{attn}.v_proj.weight"] = (kv_out, hidden)
        shapes[f"{attn}.o_proj.weight"] = (hidden, q_out)
        if arch.attention_bias:
            shapes[f"{attn}.q_proj.bias"] = (q_out,)
            shapes[f"{attn}.k_proj.bias"] = (kv_out,)
            shapes[f"{attn}.v_proj.bias"] = (kv_out,)
            # HF Llama/Mistral/Qwen3 put a bias on o_proj too with attention_bias; Qwen2 does not.
            if arch.o_proj_bias:
                shapes[f"{attn}.o_proj.bias"] = (hidden,)
        if arch.qk_norm:
            shapes[f"{attn}.q_norm.weight"] = (head_dim,)
            shapes[f"{attn}.k_norm.weight"] = (head_dim,)
        shapes[f"{mlp}.gate_proj.weight"] = (arch.intermediate_size, hidden)
        shapes[f"{mlp}.up_proj.weight"] = (arch.intermediate_size, hidden)
        shapes[f"{mlp}.down_proj.weight"] = (hidden, arch.intermediate_size)
        if arch.mlp_bias:
            shapes[f"{mlp}.gate_proj.bias"] = (arch.intermediate_size,)
            shapes[f"{mlp}.up_proj.bias"] = (arch.intermediate_size,)
            shapes[f"{mlp}.down_proj.bias"] = (hidden,)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    return shapes


def load_checkpoint(model: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Checkpoint:
    """Open `model`: a preset name ("tiny-random", "smollm2-135m"), an HF folder, or a .gguf file.

    GGUF files and presets are materialised once as HF folders under `cache_dir` (default: see
    `medha.model.cache_dir.default_cache_dir`), then loaded like any HF folder.
    """
    from medha.model import presets
    from medha.model.gguf_convert import convert_gguf

    if isinstance(model, str) and model in presets.PRESET_NAMES:
        folder = presets.materialize_preset(model, cache_dir=cache_dir)
    else:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            folder = convert_gguf(path, cache_dir=cache_dir)
        elif path.is_dir():
            folder = path
        elif path.exists():
            raise ModelLoadError(path, "not a checkpoint folder or a .gguf file")
        else:
            # A Hub id ("meta-llama/Llama-3.1-8B") looks like a relative path.
            hub = "; medha never downloads weights: give the folder a Hub id was downloaded to"
            raise ModelLoadError(
                path,
                "no such file or folder, and not a preset name "
                f"(presets: {', '.join(presets.PRESET_NAMES)})"
                + (hub if _looks_like_a_hub_id(model) else ""),
            )
    return load_hf_folder(folder)


def _looks_like_a_hub_id(model: object) -> bool:
    """ "meta-llama/Llama-3.1-8B", not "./mymodel" or "/models"."""
    return isinstance(model, str) and model.count("/") == 1 and model[0] not in "./~"


def load_hf_folder(folder: Path) -> Checkpoint:
    """Validate and open a Hugging Face checkpoint folder (safetensors weights only)."""
    folder = Path(folder)
    config = _read_json_file(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise ModelLoadError(folder / CONFIG_FILE, "must hold a JSON object")
    arch = ModelArch.from_hf_config(config, source=str(folder / CONFIG_FILE))
    tensors = _index_weight_files(folder)
    if arch.tie_word_embeddings and _distinct_lm_head(tensors):
        # As transformers (5.x) loads such a file: the config is wrong, the file's head used.
        log.warning(
            "tie_word_embeddings is set but the checkpoint has its own, different lm_head: "
            "not tied (set tie_word_embeddings to false in config.json to silence this)",
            path=str(folder),
        )
        arch = arch.replace(tie_word_embeddings=False)
    _check_tensors(tensors, expected_tensor_shapes(arch), folder)
    tokenizer = Tokenizer.from_folder(
        folder,
        config_eos_token_ids=(*arch.eos_token_ids, *_generation_eos_ids(folder)),
        config_bos_token_id=arch.bos_token_id,
    )
    if tokenizer.vocab_size > arch.vocab_size:
        # Not fatal: transformers' GGUF tokenizer conversion adds a <|endoftext|> the model never
        # saw (e.g. to Llama-3 files). Only text spelling out such a token would hit it.
        log.warning(
            "tokenizer has ids beyond the model's vocabulary",
            path=str(folder / "tokenizer.json"),
            tokenizer_size=tokenizer.vocab_size,
            vocab_size=arch.vocab_size,
        )
    log.debug("checkpoint opened", path=str(folder), arch=arch.architecture, tensors=len(tensors))
    return Checkpoint(path=folder, arch=arch, tokenizer=tokenizer, tensors=tensors)


def _index_weight_files(folder: Path) -> dict[str, TensorInfo]:
    """Map every tensor name to its file, dtype and shape, from the headers (and the index)."""
    index_path, single_path = folder / WEIGHTS_INDEX_FILE, folder / SINGLE_WEIGHTS_FILE
    # The single file first, as transformers reads them: saving a model unsharded over a
    # sharded one leaves the old index behind.
    if single_path.is_file():
        if index_path.is_file():
            log.warning(
                f"{SINGLE_WEIGHTS_FILE} and {WEIGHTS_INDEX_FILE} both present: reading "
                f"{SINGLE_WEIGHTS_FILE}, as transformers does (delete the stale one)",
                folder=str(folder),
            )
        return read_safetensors_header(single_path)
    if index_path.is_file():
        return _index_sharded(index_path)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            folder / pickles[0],
            "only safetensors weights are supported; pickled weights (.bin/.pt) are never loaded "
            "(convert them to safetensors first)",
        )
    raise ModelLoadError(single_path, f"missing (and no {WEIGHTS_INDEX_FILE} either)")


def _index_sharded(index_path: Path) -> dict[str, TensorInfo]:
    index = _read_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(index_path, "has no 'weight_map' object")
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, file_name in weight_map.items():
        shard = index_path.parent / str(file_name)
        if Path(str(file_name)).suffix in _PICKLE_SUFFIXES:
            raise ModelLoadError(shard, "only safetensors weights are supported; pickles never")
        if str(file_name) not in headers:
            if not shard.is_file():
                raise ModelLoadError(
                    index_path, f"tensor {name} points at missing file {file_name}"
                )
            headers[str(file_name)] = read_safetensors_header(shard)
        info = headers[str(file_name)].get(name)
        if info is None:
            raise ModelLoadError(shard, f"does not hold tensor {name} (as {index_path.name} says)")
        tensors[name] = info
    return tensors


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header; catches truncated and garbage files."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(path, f"corrupt: only {size} bytes, not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ModelLoadError(path, "corrupt: not a safetensors file (bad header length)")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, "corrupt: safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(path, "corrupt: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            element_bytes = _ANY_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(path, f"corrupt: bad header entry for {name}: {exc!r}") from exc
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * element_bytes or begin < 0:
            raise ModelLoadError(path, f"corrupt: {name}'s byte range does not match its shape")
        ranges.append((begin, end, name))
        tensors[name] = TensorInfo(file=path, dtype=dtype, shape=shape)
    # As safetensors requires (and checks only when a weight is first read, with an error of
    # its own): the byte ranges tile the data, no gap, no overlap.
    data_end = 0
    for begin, end, name in sorted(ranges):
        if begin != data_end:
            problem = "overlaps another tensor's" if begin < data_end else "leaves a gap before it"
            raise ModelLoadError(path, f"corrupt: {name}'s byte range {problem}")
        data_end = end
    data_bytes = size - 8 - header_len
    if data_bytes != data_end:
        state = "truncated" if data_bytes < data_end else "has trailing garbage"
        raise ModelLoadError(
            path,
            f"corrupt: {state} (header describes {data_end} data bytes, file has {data_bytes})",
        )
    return tensors


def _check_tensors(
    tensors: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]], folder: Path
) -> None:
    weights_file = (
        folder / SINGLE_WEIGHTS_FILE
        if (folder / SINGLE_WEIGHTS_FILE).is_file()
        else folder / WEIGHTS_INDEX_FILE
    )
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise ModelLoadError(weights_file, f"missing tensor {name}")
        if info.shape != shape:
            raise ModelLoadError(
                info.file, f"tensor {name} has shape {info.shape}, expected {shape}"
            )
        if info.dtype not in _FLOAT_DTYPE_BYTES:
            raise ModelLoadError(
                info.file, f"tensor {name} has dtype {info.dtype}; expected a float dtype"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.debug("checkpoint has tensors the model does not use", names=unexpected[:8])


def _distinct_lm_head(tensors: Mapping[str, TensorInfo], rows_per_read: int = 4096) -> bool:
    """Whether the checkpoint holds an lm_head.weight other than its embedding, compared a
    slice of rows at a time (a large vocabulary's two matrices need not be in memory at once)."""
    from safetensors import safe_open

    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is None or embedding is None or head.shape != embedding.shape:
        return False  # nothing to compare: _check_tensors says what is missing or misshapen
    with (
        safe_open(head.file, framework="pt") as head_file,
        safe_open(embedding.file, framework="pt") as embedding_file,
    ):
        head_rows = head_file.get_slice("lm_head.weight")
        embedding_rows = embedding_file.get_slice("model.embed_tokens.weight")
        for start in range(0, head.shape[0], rows_per_read):
            rows = slice(start, start + rows_per_read)
            if not head_rows[rows].equal(embedding_rows[rows]):
                return True
    return False


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    """The end-of-sequence ids of the folder's generation_config.json, if it has one. Instruct
    models list there every id that ends a reply (Llama-3-Instruct: <|end_of_text|> and
    <|eot_id|>), where config.json may hold one; HF's generate and vLLM stop on them all."""
    path = folder / GENERATION_CONFIG_FILE
    if not path.is_file():
        return ()
    config = _read_json_file(path)
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelLoadError(path, f"eos_token_id must be an id or a list of ids, got {eos!r}")
    return tuple(ids)


def _read_json_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(path, "missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
