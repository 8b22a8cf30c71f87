"""What medha reads from a config.json beyond the shapes, and what it refuses rather than load
wrongly: sliding-window attention (served up to the window, exactly), activations other than
SiLU, rope scaling without its parameters."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medha.errors import ModelLoadError, UnsupportedModelError
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.runner import ModelRunner, load_model
from tests.hf_models import _COMMON, max_relative_error
from tests.runner_support import BLOCK_SIZE, blocks_for, prefill_in_chunks

WINDOW = 8


def _arch(config_cls: type, **extra: Any) -> tuple[ModelArch, torch.nn.Module]:
    config = config_cls(**_COMMON, num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(7)
    model = {MistralConfig: MistralForCausalLM, Qwen2Config: Qwen2ForCausalLM}[config_cls](config)
    hf_config = model.config.to_dict()
    hf_config["architectures"] = [type(model).__name__]
    return ModelArch.from_hf_config(hf_config), model.eval()


@pytest.mark.parametrize(
    ("config_cls", "extra"),
    [
        (MistralConfig, dict(sliding_window=WINDOW)),
        (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    ],
    ids=["mistral", "qwen2"],
)
def test_a_sliding_window_model_is_served_up_to_its_window_exactly(
    config_cls: type, extra: dict[str, Any]
) -> None:
    arch, hf = _arch(config_cls, **extra)
    assert arch.sliding_window == WINDOW and arch.context_len == WINDOW
    state = hf.state_dict()
    model = load_model(arch, lambda name, dtype: state[name].to(dtype))
    runner = ModelRunner(model, KVCache(arch, 4, BLOCK_SIZE), "reference")
    ids = list(range(5, 5 + WINDOW))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    actual = prefill_in_chunks(runner, ids, [3, WINDOW - 3], [0, 1, 2, 3][: blocks_for(WINDOW)])
    assert max_relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize(
    ("config_cls", "extra"),
    [
        (MistralConfig, dict(sliding_window=None)),
        (Qwen2Config, dict(use_sliding_window=False, sliding_window=WINDOW)),
        # Qwen2 slides only from layer max_window_layers on: here no layer does.
        (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3)),
    ],
    ids=["mistral without a window", "qwen2 with the window off", "qwen2 past its last layer"],
)
def test_a_window_no_layer_uses_leaves_the_whole_context(
    config_cls: type, extra: dict[str, Any]
) -> None:
    arch, _ = _arch(config_cls, **extra)
    assert arch.sliding_window is None and arch.context_len == _COMMON["max_position_embeddings"]


def _llama_config(**changes: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **changes,
    }


def test_an_older_config_without_layer_types_caps_whenever_its_window_is_on() -> None:
    """Without layer_types, transformers read Qwen2's max_window_layers both ways over its
    versions (and vLLM slides every layer): a window that is on caps the context whatever it
    says, which is exact under any reading."""
    mistral = _llama_config(architectures=["MistralForCausalLM"], sliding_window=16)
    assert ModelArch.from_hf_config(mistral).sliding_window == 16
    qwen2 = _llama_config(architectures=["Qwen2ForCausalLM"], sliding_window=16)
    assert ModelArch.from_hf_config(qwen2).sliding_window is None
    for max_window_layers in (0, 1, 2):  # of 2 layers
        qwen2.update(use_sliding_window=True, max_window_layers=max_window_layers)
        assert ModelArch.from_hf_config(qwen2).sliding_window == 16


@pytest.mark.parametrize("activation", ["silu", "swish", None])
def test_silu_is_the_activation(activation: str | None) -> None:
    changes = {} if activation is None else {"hidden_act": activation}
    ModelArch.from_hf_config(_llama_config(**changes))


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_another_activation_is_refused(activation: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"hidden_act '{activation}'"):
        ModelArch.from_hf_config(_llama_config(hidden_act=activation))


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear"},
        {"rope_type": "linear", "factor": "abc"},
        {"rope_type": "linear", "factor": 0},
        {"type": "linear", "factor": None},
        {"rope_type": "linear", "factor": float("inf")},
        {"rope_type": "llama3", "factor": 8.0},
    ],
)
def test_rope_scaling_without_its_parameters_is_a_malformed_config(
    rope_scaling: dict[str, Any],
) -> None:
    with pytest.raises(ModelLoadError, match="malformed config"):
        ModelArch.from_hf_config(_llama_config(rope_scaling=rope_scaling))


def test_rope_scaling_parameters_are_read_as_numbers() -> None:
    arch = ModelArch.from_hf_config(
        _llama_config(
            rope_scaling={
                "rope_type": "llama3",
                "factor": "8",
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192.0,
            }
        )
    )
    assert arch.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


@pytest.mark.parametrize(
    ("arch", "flags", "attention_bias", "mlp_bias"),
    [
        # transformers' Qwen2 always has q/k/v bias, Mistral none, whatever the config says;
        # only Llama reads mlp_bias.
        ("Qwen2ForCausalLM", dict(attention_bias=False, mlp_bias=True), True, False),
        ("MistralForCausalLM", dict(attention_bias=True, mlp_bias=True), False, False),
        ("Qwen3ForCausalLM", dict(attention_bias=True, mlp_bias=True), True, False),
        ("Qwen3ForCausalLM", {}, False, False),
        ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True), True, True),
    ],
)
def test_biases_are_where_transformers_puts_them(
    arch: str, flags: dict[str, bool], attention_bias: bool, mlp_bias: bool
) -> None:
    read = ModelArch.from_hf_config(_llama_config(architectures=[arch], **flags))
    assert (read.attention_bias, read.mlp_bias) == (attention_bias, mlp_bias)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(rope_scaling="linear"), "rope_scaling must be an object"),
        (dict(rope_parameters=["x"]), "rope_parameters must be an object"),
        (dict(num_hidden_layers=-1), "num_layers must be > 0"),
        (dict(num_attention_heads=0), "malformed config"),
        (dict(head_dim=-8), "head_dim must be > 0"),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
        (dict(architectures="LlamaForCausalLM"), "architectures must be a list"),
        (dict(head_dim=0), "head_dim must be > 0"),  # not read as "none given"
        (dict(max_position_embeddings=0), "max_position_embeddings must be > 0"),
        (dict(max_position_embeddings=float("inf")), "OverflowError"),  # JSON's Infinity
        (dict(architectures=["MistralForCausalLM"], sliding_window=0), "sliding_window must"),
        (dict(rope_theta=0), "rope_theta must be a finite number > 0"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be"),
        (dict(eos_token_id=-1), "eos_token_id must be ids >= 0"),
    ],
)
def test_a_malformed_config_names_its_file_and_the_field(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message) as raised:
        ModelArch.from_hf_config(_llama_config(**changes), source="/models/m/config.json")
    assert str(raised.value).startswith("/models/m/config.json: ")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "changes",
    [
        dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 64}),
        dict(rope_scaling=LLAMA3, max_position_embeddings=96),
        dict(
            rope_scaling={**LLAMA3, "original_max_position_embeddings": 64},
            original_max_position_embeddings=32,
        ),
    ],
    ids=["its-own", "none-given", "top-level-first"],
)
def test_the_length_a_llama3_scaling_stretches_is_the_one_transformers_fills_in(
    changes: dict[str, Any],
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _llama_config(**changes)
    # Read off the model, not the config: the model's rotary embedding fills the length in
    # again, and there the top-level value wins.
    model = LlamaForCausalLM(LlamaConfig.from_dict(copy.deepcopy(config)))
    theirs = model.config.rope_parameters["original_max_position_embeddings"]
    read = ModelArch.from_hf_config(config)
    assert read.rope_scaling is not None
    assert read.rope_scaling["original_max_position_embeddings"] == theirs


def test_where_a_config_leaves_them_out_the_defaults_are_transformers() -> None:
    from transformers import MistralConfig, Qwen3Config

    # Qwen3's head_dim is 128, not hidden / heads; Mistral's window 4096 (null turns it off).
    qwen3 = _llama_config(
        architectures=["Qwen3ForCausalLM"], hidden_size=1024, num_attention_heads=16
    )
    assert ModelArch.from_hf_config(qwen3).head_dim == Qwen3Config(**qwen3).head_dim == 128
    mistral = _llama_config(architectures=["MistralForCausalLM"], max_position_embeddings=32768)
    assert ModelArch.from_hf_config(mistral).sliding_window == MistralConfig().sliding_window
    assert ModelArch.from_hf_config(mistral).context_len == 4096
    unwindowed = {**mistral, "sliding_window": None}
    assert ModelArch.from_hf_config(unwindowed).sliding_window is None
    llama = _llama_config(head_dim=None)
    assert ModelArch.from_hf_config(llama).head_dim == 32 // 4


@pytest.mark.parametrize(
    "changes",
    [
        dict(rope_theta=100.0, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        dict(rope_parameters={"type": "linear", "factor": 3.0, "rope_theta": 5000.0}),
        dict(
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            rope_parameters={"rope_type": "default", "rope_theta": 300.0},
        ),
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
        dict(
            rope_scaling={},
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 700.0},
        ),
        dict(rope_theta=900.0),
    ],
    ids=[
        "the-dicts-base-first",
        "the-older-type-key",
        "rope-scaling-replaces-rope-parameters",
        "a-base-inside-rope-scaling",
        "an-empty-rope-scaling",
        "only-the-top-level-base",
    ],
)
def test_the_rope_is_read_as_transformers_reads_it(changes: dict[str, Any]) -> None:
    """Whichever of rope_scaling (the older key), rope_parameters and the top-level rope_theta
    a config.json holds: read as transformers 5 resolves them, off the model it builds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _llama_config(**changes)
    # A copy: transformers writes its resolution into the dicts it is given.
    theirs = LlamaForCausalLM(LlamaConfig.from_dict(copy.deepcopy(config))).config.rope_parameters
    read = ModelArch.from_hf_config(config)
    assert read.rope_theta == theirs["rope_theta"]
    assert read.rope_type == theirs["rope_type"]
    assert (read.rope_scaling or {}).get("factor") == theirs.get("factor")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear", "factor": 2}),
            "partial_rotary_factor 0.5 with 'linear'",
        ),
        (dict(rope_parameters={"rope_type": "yarn", "partial_rotary_factor": 0.25}), "0.25"),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "default"}}),
            "rope parameters per layer type",
        ),
    ],
)
def test_a_rope_medha_does_not_apply_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        ModelArch.from_hf_config(_llama_config(**changes))
    # The whole head; a plain rope, which transformers rotates whole whatever the factor.
    ModelArch.from_hf_config(_llama_config(partial_rotary_factor=1.0))
    assert ModelArch.from_hf_config(_llama_config(partial_rotary_factor=0.5)).rope_scaling is None
