"""Sampling defaults from a model's generation_config.json (EngineConfig.generation_config, as
vLLM's --generation-config): read as vLLM reads them, used by a request without
SamplingParams and, on the server, for each of the five fields a request leaves out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import medha
from medha import SamplingParams
from medha.errors import ModelLoadError
from medha.model.generation_defaults import configured_defaults, sampling_defaults
from medha.model.presets import materialize_preset
from tests.engine_support import MODEL, engine_config
from tests.server_support import openai_client

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _folder(tmp_path: Path, config: dict[str, Any]) -> Path:
    """The tiny model's checkpoint with this generation_config.json."""
    folder = tmp_path / "model"
    shutil.copytree(materialize_preset(MODEL), folder)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def _write(tmp_path: Path, config: object) -> Path:
    tmp_path.joinpath("generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_fields_that_differ_from_transformers_defaults_are_taken(tmp_path: Path) -> None:
    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    qwen.update(repetition_penalty=1.05, eos_token_id=[151645, 151643], bos_token_id=151643)
    assert sampling_defaults(_write(tmp_path, qwen)) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    # transformers' own defaults (top_k 50 among them) recommend nothing, as vLLM reads them.
    plain = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "max_new_tokens": 9}
    assert sampling_defaults(_write(tmp_path, plain)) == {}
    assert sampling_defaults(tmp_path / "nowhere") == {}


@pytest.mark.parametrize(
    "bad", [{"temperature": "hot"}, {"top_p": 0.0}, {"top_k": True}, [1], {"min_p": 2.0}]
)
def test_a_file_whose_defaults_cannot_be_sampling_params_is_a_load_error(
    tmp_path: Path, bad: object
) -> None:
    with pytest.raises(ModelLoadError, match=r"generation_config\.json"):
        sampling_defaults(_write(tmp_path, bad))


def test_the_setting_names_the_models_file_none_or_another_folders(tmp_path: Path) -> None:
    model, other = tmp_path / "a", tmp_path / "b"
    model.mkdir()
    other.mkdir()
    _write(model, {"top_k": 3})
    _write(other, {"top_k": 4})
    assert configured_defaults("auto", model) == {"top_k": 3}
    assert configured_defaults("vllm", model) == {}
    assert configured_defaults(str(other), model) == {"top_k": 4}
    with pytest.raises(ModelLoadError, match="missing"):
        configured_defaults(str(tmp_path / "c"), model)


async def test_requests_without_sampling_take_the_models_defaults(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"temperature": 0.0, "top_k": 5})
    greedy = SamplingParams(max_tokens=16, temperature=0.0, top_k=5)
    async with medha.Engine(engine_config(model=str(folder))) as engine:
        assert engine.sampling_defaults == {"temperature": 0.0, "top_k": 5}
        alone = await engine.generate(PROMPT)
        expected = await engine.generate(PROMPT, greedy)
    async with medha.Engine(engine_config(model=str(folder), generation_config="vllm")) as plain:
        assert plain.sampling_defaults == {}
    assert alone.token_ids == expected.token_ids and len(alone.token_ids) == 16
    with medha.LLM(engine_config(model=str(folder))) as llm:
        (done,) = llm.generate(PROMPT)
    assert done.token_ids == expected.token_ids


async def test_the_server_takes_the_models_defaults_for_the_fields_left_out(
    tmp_path: Path,
) -> None:
    folder = _folder(tmp_path, {"temperature": 0.0, "top_k": 5})
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8}
    async with medha.Engine(engine_config(model=str(folder))) as engine:
        client, http = openai_client(engine, served_model_name=MODEL)
        async with http:
            left_out = await client.completions.create(**body)
            nulls = await client.completions.create(**body, extra_body={"temperature": None})
            seeded = await client.completions.create(**body, temperature=1.0, seed=3)
            answer = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
        greedy = await engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0))
        # temperature given, top_k still the model's: the two are taken field by field.
        sampled = await engine.generate(
            PROMPT, SamplingParams(max_tokens=8, temperature=1.0, top_k=5, seed=3)
        )
    assert left_out.choices[0].text == nulls.choices[0].text == greedy.text
    assert seeded.choices[0].text == sampled.text
    assert answer.temperature == 0.0  # the value used, as OpenAI's response repeats it
