"""Convert a .gguf file once into an HF checkpoint folder in the cache, then reuse it.

The conversion is delegated to transformers' own GGUF loader (which dequantizes and undoes
llama.cpp's Q/K row permutation), and its weights are saved as they come out. So the cached folder
gives exactly the logits transformers computes when it loads the GGUF itself, which is the
reference our exactness tests compare against. Quantized GGUFs therefore become float32 folders:
several times the size of the file, the price of not hand-rolling dequantization.

The cache key is a hash of the file's content (plus a format version): copies of one GGUF (a
reinstall, another virtualenv, a fresh clone's) share one conversion, and an edited file never
reuses a stale one. A file is hashed once (~0.1 s for SmolLM2's 100 MB, seconds for an 8B
model's 5 GB); the digest is remembered per (path, size, mtime) in the cache's digests.json, so
a later load costs a `stat`. Only the GGUF is read: tokenizer files that happen to lie beside it
are not its tokenizer. A cache entry that is incomplete (a file deleted or truncated) is
converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medha.errors import ModelLoadError, UnsupportedModelError
from medha.log import get_logger
from medha.model.cache_dir import atomic_folder, default_cache_dir
from medha.model.gguf_rope import gguf_rope_scaling

log = get_logger(__name__)

# Bump when the folder layout written below changes, so stale cache entries are not reused.
_FORMAT_VERSION = 3  # 3: the rope scaling (gguf_rope) is in config.json
_ENTRY_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_DIGESTS_FILE = "digests.json"
_MEMO_ENTRIES = 256
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def cached_folder_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cache folder `gguf_path` converts to (it may not exist yet)."""
    resolved = gguf_path.expanduser().resolve()
    root = (cache_dir or default_cache_dir()) / "gguf"
    return root / f"{resolved.stem}-{_content_key(gguf_path, resolved, root)}"


def _content_key(gguf_path: Path, resolved: Path, root: Path) -> str:
    """The hash of the file's content, remembered per (path, size, mtime) in the cache, so
    that a file is hashed once (8 workers each hashing a 5 GB model would read 40 GB)."""
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise ModelLoadError(gguf_path, f"cannot read: {exc}") from exc
    memo_file = root / _DIGESTS_FILE
    # The format version is part of what is remembered: a file converted by an older medha
    # (format 2 dropped the rope scaling) is hashed, and so converted, again.
    seen = f"v{_FORMAT_VERSION}\0{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = _read_memo(memo_file)
    if seen in memo:
        return memo[seen]
    digest = hashlib.sha256(f"medha-gguf-v{_FORMAT_VERSION}\0".encode())
    try:
        with resolved.open("rb") as file:
            hashlib.file_digest(file, lambda: digest)
    except OSError as exc:
        raise ModelLoadError(gguf_path, f"cannot read: {exc}") from exc
    key = digest.hexdigest()[:16]
    memo = {**dict(list(memo.items())[-(_MEMO_ENTRIES - 1) :]), seen: key}
    with contextlib.suppress(OSError):  # a read-only cache: hash again next time
        root.mkdir(parents=True, exist_ok=True)
        staging = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(memo, indent=0) + "\n", encoding="utf-8")
        os.replace(staging, memo_file)
    return key


def _read_memo(memo_file: Path) -> dict[str, str]:
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {k: v for k, v in memo.items() if isinstance(k, str) and isinstance(v, str)}


def convert_gguf(gguf_path: Path, *, cache_dir: Path | None = None) -> Path:
    """Return the HF folder for `gguf_path`, converting it first if it is not cached yet."""
    folder = cached_folder_for(gguf_path, cache_dir)
    if folder.is_dir():
        problem = _entry_problem(folder)
        if problem is None:
            log.debug("gguf cache hit", gguf=str(gguf_path), folder=str(folder))
            return folder
        log.warning("converting again: broken cache entry", folder=str(folder), problem=problem)
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            raise ModelLoadError(
                folder,
                f"a broken cache entry ({problem}) that cannot be removed ({exc}); delete it",
            ) from exc
    header = _gguf_header(gguf_path)
    started = time.perf_counter()
    with (
        _status_line(f"Converting {gguf_path.name} to safetensors (once)"),
        _gguf_alone(gguf_path.expanduser().resolve()) as alone,
        atomic_folder(folder) as staging,
    ):
        _write_hf_folder(alone, staging, header, gguf_path)
    log.info(
        "converted gguf",
        gguf=str(gguf_path),
        architecture=header.architecture,
        folder=str(folder),
        seconds=round(time.perf_counter() - started, 2),
    )
    return folder


@dataclass(frozen=True)
class _Header:
    """What the conversion takes from a GGUF's header itself, besides transformers' reading."""

    architecture: str
    head_dim: int | None
    """llama.cpp's key length, where the file has one: transformers' GGUF config mapping reads
    no head size for qwen3 (Qwen3-0.6B's 128 is not hidden / heads)."""
    rope_parameters: dict[str, Any] | None
    """The rope scaling transformers' GGUF loader drops (gguf_rope), with its theta."""


def _gguf_header(gguf_path: Path) -> _Header:
    """Read the header before anything is dequantized: corrupt or unsupported files, and rope
    scalings medha cannot reproduce, raise here, in a moment."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
        field = reader.fields["general.architecture"]
        architecture = str(field.contents())
    except KeyError as exc:
        raise ModelLoadError(gguf_path, "corrupt: no general.architecture in the header") from exc
    except Exception as exc:
        raise ModelLoadError(gguf_path, f"corrupt: not a readable GGUF file ({exc})") from exc
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            gguf_path,
            f"GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})",
        )

    def number(key: str) -> Any:
        found = reader.fields.get(f"{architecture}.{key}")
        return None if found is None else found.contents()

    try:
        key_length = number("attention.key_length")
        heads = number("attention.head_count")
        rope_dim = number("rope.dimension_count")
        theta = float(number("rope.freq_base") or 10000.0)
        head_dim = int(key_length or rope_dim or number("embedding_length") // heads)
        scaling = gguf_rope_scaling(gguf_path, reader, architecture, head_dim, theta)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(gguf_path, f"malformed header: {exc!r}") from exc
    return _Header(
        architecture,
        None if key_length is None else int(key_length),
        None if scaling is None else {"rope_theta": theta, **scaling},
    )


def _entry_problem(folder: Path) -> str | None:
    """What makes a cache entry unusable (a file missing, the weights truncated), or None."""
    for name in _ENTRY_FILES:
        if not (folder / name).is_file():
            return f"{name} missing"
    weights = folder / "model.safetensors"
    try:
        size = weights.stat().st_size
        with weights.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if header_length > size - 8:
                return "model.safetensors truncated"
            header = json.loads(file.read(header_length))
        data_end = max(
            (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
        if size < 8 + header_length + data_end:
            return "model.safetensors truncated"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"model.safetensors unreadable ({exc})"
    return None


@contextlib.contextmanager
def _gguf_alone(gguf_path: Path) -> Iterator[Path]:
    """The GGUF in a temporary folder of its own. transformers reads tokenizer files lying
    beside a GGUF in preference to the GGUF's own tokenizer: that folder holds no others. A
    symbolic link where the system allows one (Windows needs a privilege), else a hard link,
    else a copy."""
    with tempfile.TemporaryDirectory(prefix="medha-gguf-") as folder:
        # transformers tells a GGUF by its lower-case suffix: another name is read as a
        # torch pickle (which its weights-only loader refuses).
        alone = Path(folder) / f"{gguf_path.stem}.gguf"
        try:
            os.symlink(gguf_path, alone)
        except OSError:
            try:
                os.link(gguf_path, alone)
            except OSError:
                shutil.copyfile(gguf_path, alone)
        yield alone


def _write_hf_folder(gguf_path: Path, folder: Path, header: _Header, source: Path) -> None:
    """Load the GGUF with transformers and save config, weights and tokenizer into `folder`;
    `gguf_path` lies alone in its folder (_gguf_alone), a stand-in for the user's `source`,
    which errors name."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        with _captured_stderr():
            hf_config = AutoConfig.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
            if header.head_dim is not None:
                # Set on the config, not passed to from_pretrained: a config class without the
                # field (Qwen2's) would hand it on to the model's constructor, which refuses it.
                hf_config.head_dim = header.head_dim
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                config=hf_config,
                local_files_only=True,
                # Dense weights even where a packed-GGUF matmul kernel is installed.
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
    except Exception as exc:
        raise ModelLoadError(source, f"transformers could not convert it: {exc}") from exc

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    if header.rope_parameters is not None:  # transformers reads the base, not the scaling
        config.pop("rope_scaling", None)
        config["rope_parameters"] = header.rope_parameters
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same storage as the embedding; saved once
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {name: tensor.detach().contiguous() for name, tensor in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "source": gguf_path.name},
    )
    tokenizer.save_pretrained(str(folder))
    _move_chat_template_into_config(folder)


def _move_chat_template_into_config(folder: Path) -> None:
    """Keep the chat template in tokenizer_config.json (newer transformers write a .jinja file)."""
    template_file = folder / "chat_template.jinja"
    if not template_file.is_file():
        return
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = template_file.read_text(encoding="utf-8")
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    template_file.unlink()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[None]:
    """Keep transformers' own progress bars out of the terminal; log what they printed."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        lines = re.split(r"[\r\n]+", captured.getvalue())
        # Progress-bar redraws say nothing once the work is done; keep warnings and the like.
        if kept := [line for line in lines if line.strip() and "it/s]" not in line]:
            log.debug("transformers output during gguf conversion", output="\n".join(kept)[-2000:])


@contextlib.contextmanager
def _status_line(message: str) -> Iterator[None]:
    """A rich spinner on stderr while slow work runs, only when a person is watching."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    # Bound to the real stderr now: the conversion redirects sys.stderr while it runs.
    with Console(file=sys.stderr).status(message):
        yield
