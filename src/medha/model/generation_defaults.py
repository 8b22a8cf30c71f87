"""The sampling defaults a checkpoint's generation_config.json gives, as vLLM takes them.

Instruct models ship their recommended sampling there (Qwen2.5-Instruct: temperature 0.7,
top_p 0.8, top_k 20, repetition_penalty 1.05), and vLLM (`--generation-config auto`, its
default) uses them for the fields a request leaves out. medha does the same (EngineConfig's
`generation_config`): the same request then samples from the same distribution on both.

As vLLM, only the fields that differ from transformers' GenerationConfig defaults count (a
file's `top_k: 50`, transformers' own default, is not a recommendation), and `do_sample` is
not read. `max_new_tokens` is not taken: a request without `max_tokens` generates what the
context leaves, as without the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medha.errors import InvalidSamplingParamsError, ModelLoadError
from medha.sampling import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"

AUTO, VLLM = "auto", "vllm"
"""EngineConfig.generation_config's names: the model's file, or SamplingParams' defaults."""

_HF_DEFAULTS: dict[str, float | None] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
}
"""The sampling fields medha takes from the file, with transformers' defaults for them."""


def sampling_defaults(folder: Path) -> dict[str, float | int]:
    """SamplingParams fields from `folder`'s generation_config.json ({} without one)."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(path, "must hold a JSON object")
    defaults: dict[str, float | int] = {}
    for name, hf_default in _HF_DEFAULTS.items():
        value: Any = config.get(name)
        if value is None or value == hf_default:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelLoadError(path, f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ModelLoadError(path, f"{name} must be finite, got {value!r}")
        defaults[name] = int(value) if name == "top_k" else float(value)
    try:
        SamplingParams(**defaults)  # type: ignore[arg-type]
    except InvalidSamplingParamsError as exc:  # top_p 0, a negative temperature, ...
        raise ModelLoadError(path, str(exc)) from exc
    return defaults


def configured_defaults(setting: str, model_folder: Path) -> dict[str, float | int]:
    """The sampling defaults EngineConfig.generation_config names: the model folder's file
    ("auto"), none ("vllm"), or the file in the folder it names (which must have one)."""
    if setting == VLLM:
        return {}
    if setting == AUTO:
        return sampling_defaults(model_folder)
    folder = Path(setting).expanduser()
    if not (folder / GENERATION_CONFIG_FILE).is_file():
        raise ModelLoadError(folder / GENERATION_CONFIG_FILE, "missing (generation_config)")
    return sampling_defaults(folder)
