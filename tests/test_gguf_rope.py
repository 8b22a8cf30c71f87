"""A GGUF's rope scaling survives conversion (transformers' GGUF loader drops it): llama.cpp's
`rope_freqs` divisors (Llama 3.1's llama3 scaling) and its `linear`/`yarn` metadata become the
config's rope parameters, and the converted folder computes the original model's logits.
Scalings medha cannot reproduce are refused, never run unscaled."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medha.errors import ModelLoadError, UnsupportedModelError
from medha.model.loader import load_checkpoint
from tests.gguf_support import gguf_with

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 512,
}
QWEN3 = {
    **LLAMA,
    "architectures": ["Qwen3ForCausalLM"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "rope_theta": 1000000.0,
}


def _llama_cpp_rope_freqs(config: dict[str, Any]) -> np.ndarray:
    """The divisors llama.cpp's convert_hf_to_gguf.py writes for a llama3 rope scaling."""
    scaling = config["rope_scaling"]
    dim = config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    divisors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            divisors.append(1.0)
        elif wavelength > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    ids = torch.tensor([[(11 * i + 5) % 320 for i in range(300)]])  # past the original lengths
    with torch.no_grad():
        return model(ids).logits[0]


def _llama3(factor: float, low: float, high: float, original: int) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


@pytest.mark.parametrize(
    ("shape", "scaling", "read_back"),
    [
        # Llama 3.1's parameters: llama.cpp's defaults, taken as they are wherever they fit.
        (dict(rope_theta=10000.0), _llama3(8.0, 1.0, 4.0, 8192), _llama3(8.0, 1.0, 4.0, 8192)),
        (dict(rope_theta=500000.0), _llama3(8.0, 1.0, 4.0, 8192), _llama3(8.0, 1.0, 4.0, 8192)),
        # Llama 3.2 1B's theta, head size and factor, where a fitted line is off by 1e-6.
        (
            dict(rope_theta=500000.0, hidden_size=128),
            _llama3(32.0, 1.0, 4.0, 8192),
            _llama3(32.0, 1.0, 4.0, 8192),
        ),
        # Others are fitted to the divisors between 1 and the factor.
        (dict(rope_theta=10000.0), _llama3(8.0, 1.0, 4.0, 64), _llama3(8.0, 1.0, 4.0, 64)),
        # low, high and the original length matter only through the line: low is taken as 1.
        (dict(rope_theta=10000.0), _llama3(16.0, 2.0, 8.0, 128), _llama3(16.0, 1.0, 4.0, 64)),
    ],
    ids=["llama-3.1", "llama-3.1-theta", "llama-3.2-1b", "short-original", "fitted"],
)
def test_llama_cpp_rope_freqs_become_the_llama3_scaling(
    shape: dict[str, Any], scaling: dict[str, Any], read_back: dict[str, Any], tmp_path: Path
) -> None:
    config = {**LLAMA, **shape, "rope_scaling": scaling}
    divisors = _llama_cpp_rope_freqs(config)
    assert divisors.max() > 1.0 and divisors.min() == 1.0
    hf_folder, gguf_path = gguf_with(
        config, tmp_path, "llama", tensors={"rope_freqs.weight": divisors}
    )
    converted = load_checkpoint(gguf_path, cache_dir=tmp_path / "cache")
    assert converted.arch.rope_scaling == read_back
    torch.testing.assert_close(_logits(converted.path), _logits(hf_folder), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("architecture", "config", "metadata", "scaling"),
    [
        (
            "llama",
            {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
            {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
            {"rope_type": "linear", "factor": 4.0},
        ),
        (
            "llama",  # llama.cpp's older key
            {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            {"rope.scale_linear": 2.0},
            {"rope_type": "linear", "factor": 2.0},
        ),
        (
            "qwen3",
            {**QWEN3, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 128}},
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
             "rope.scaling.original_context_length": 128},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        ),
        ("qwen3", QWEN3, {"rope.scaling.type": "none"}, None),
    ],
    ids=["linear", "scale-linear", "qwen3-yarn", "qwen3-none"],
)  # fmt: skip
def test_rope_scaling_metadata_becomes_the_configs(
    architecture: str,
    config: dict[str, Any],
    metadata: dict[str, Any],
    scaling: dict[str, Any] | None,
    tmp_path: Path,
) -> None:
    hf_folder, gguf_path = gguf_with(config, tmp_path, architecture, metadata=metadata)
    converted = load_checkpoint(gguf_path, cache_dir=tmp_path / "cache")
    original = load_checkpoint(hf_folder).arch
    assert converted.arch.rope_scaling == original.rope_scaling == scaling
    assert converted.arch.context_len == original.context_len
    assert converted.arch.qk_norm == (architecture == "qwen3")
    assert converted.arch.head_dim == original.head_dim
    torch.testing.assert_close(_logits(converted.path), _logits(hf_folder), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        ({"rope.scaling.type": "longrope"}, {}, "rope scaling 'longrope' is not supported"),
        (
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
             "rope.scaling.yarn_log_multiplier": 0.1},
            {},
            "yarn_log_multiplier is not supported",
        ),
        ({}, {"rope_freqs.weight": np.linspace(1, 3, 16, dtype=np.float32)[::-1].copy()},
         "no llama3 rope scaling"),
        ({}, {"rope_freqs.weight": np.ones(5, dtype=np.float32)}, "has 5 values, expected 16"),
        # One divisor between 1 and the factor, and not llama.cpp's defaults: many scalings
        # give these divisors, and medha does not guess.
        ({}, {"rope_freqs.weight": _llama_cpp_rope_freqs(
            {**LLAMA, "rope_scaling": _llama3(8.0, 1.0, 4.0, 64)})}, "no llama3 rope scaling"),
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 2.0},
         {"rope_freqs.weight": np.full(16, 2.0, dtype=np.float32)}, "both a 'linear'"),
    ],
    ids=[
        "longrope",
        "yarn-log-multiplier",
        "rope-freqs-not-llama3",
        "rope-freqs-size",
        "rope-freqs-underdetermined",
        "both",
    ],
)  # fmt: skip
def test_a_rope_scaling_medha_cannot_reproduce_is_refused_before_converting(
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medha.model import gguf_convert

    def no_conversion(*args: object) -> None:
        raise AssertionError("dequantized the weights before reading the rope scaling")

    monkeypatch.setattr(gguf_convert, "_write_hf_folder", no_conversion)
    _, gguf_path = gguf_with(LLAMA, tmp_path, "llama", metadata=metadata, tensors=tensors)
    with pytest.raises(UnsupportedModelError, match=message):
        load_checkpoint(gguf_path, cache_dir=tmp_path / "cache")


def test_a_scaling_without_its_factor_is_a_malformed_header(tmp_path: Path) -> None:
    _, gguf_path = gguf_with(LLAMA, tmp_path, "llama", metadata={"rope.scaling.type": "linear"})
    with pytest.raises(ModelLoadError, match="malformed header"):
        load_checkpoint(gguf_path, cache_dir=tmp_path / "cache")
