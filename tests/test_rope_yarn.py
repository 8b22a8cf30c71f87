"""YaRN rope scaling (Qwen2.5 and Qwen3 past 32K tokens, DeepSeek): the frequencies and the
cos/sin factor are transformers' own for every parameter it reads, and the context the
model is served to is the trained length times the factor, as vLLM derives it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from medha.errors import ModelLoadError
from medha.model.arch import ModelArch
from medha.model.rope import RotaryEmbedding, attention_factor, inverse_frequencies

_SHAPE = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
)


def _configs(rope_scaling: dict[str, Any], head_dim: int = 64) -> tuple[Qwen3Config, ModelArch]:
    hf = Qwen3Config(
        **_SHAPE, head_dim=head_dim, rope_theta=1000000.0, rope_scaling=dict(rope_scaling)
    )
    raw = {"architectures": ["Qwen3ForCausalLM"], **_SHAPE, "head_dim": head_dim}
    raw.update(rope_theta=1000000.0, rope_scaling=dict(rope_scaling))
    return hf, ModelArch.from_hf_config(raw)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
        {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024},  # older name
        {"rope_type": "yarn", "factor": 8.0},  # the original length is max_position_embeddings
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
         "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
         "mscale": 1.0, "mscale_all_dim": 0.707},  # DeepSeek's
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
         "attention_factor": 1.25},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
         "beta_fast": None, "attention_factor": None},  # null is the default
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
         "truncate": None},  # but a null truncate is false, as transformers reads it
        {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 8192},
        # So short a length that no dimension turns once: the ramp would have zero width.
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 6},
    ],
)  # fmt: skip
def test_yarn_frequencies_and_factor_are_transformers_own(rope_scaling: dict[str, Any]) -> None:
    hf, arch = _configs(rope_scaling)
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    assert torch.equal(inverse_frequencies(arch), expected)
    assert attention_factor(arch) == expected_factor


def test_cos_and_sin_carry_the_attention_factor_as_transformers_rotary_embedding() -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    hf, arch = _configs(scaling)
    positions = torch.tensor([0, 1, 2047, 2048, 8191])
    x = torch.zeros(1, 5, 64, dtype=torch.bfloat16)
    hf_cos, hf_sin = Qwen3RotaryEmbedding(hf)(x, positions[None])
    cos, sin = RotaryEmbedding(arch).cos_sin(positions, torch.bfloat16)
    assert attention_factor(arch) > 1
    assert torch.equal(cos[:, 0], hf_cos[0]) and torch.equal(sin[:, 0], hf_sin[0])


def test_the_context_is_the_trained_length_times_the_factor() -> None:
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    assert _configs(scaling)[1].context_len == 8192
    # Qwen3's cards: max_position_embeddings 40,960, YaRN 4 x 32,768 = 131,072.
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], **_SHAPE, "max_position_embeddings": 40960}
    qwen3["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 32768}  # fmt: skip
    assert ModelArch.from_hf_config(qwen3).context_len == 131072
    # Without an original length, max_position_embeddings is the one stretched (as in HF).
    assert _configs({"rope_type": "yarn", "factor": 2.0})[1].context_len == 16384
    # Phi-3 keeps it at the top level, where transformers looks first.
    top = {**qwen3, "original_max_position_embeddings": 16384}
    assert ModelArch.from_hf_config(top).context_len == 65536


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn"},
        {"rope_type": "yarn", "factor": 0},
        {"rope_type": "yarn", "factor": "x"},
        {"rope_type": "yarn", "factor": 4.0, "beta_fast": "fast"},
        {"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0},
        {"rope_type": "yarn", "factor": 4.0, "mscale": float("nan")},
        {"rope_type": "yarn", "factor": 4.0, "truncate": "yes"},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
    ],
)
def test_a_malformed_yarn_scaling_is_refused(rope_scaling: dict[str, Any]) -> None:
    config = {"architectures": ["Qwen3ForCausalLM"], **_SHAPE, "rope_scaling": rope_scaling}
    with pytest.raises(ModelLoadError, match="malformed config"):
        ModelArch.from_hf_config(config)
