"""StructuredOutputsParams: exactly one constraint, checked and normalised at construction (a
typed error before anything is queued), and taken by SamplingParams as itself or a dict."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medha import InvalidSamplingParamsError, SamplingParams, StructuredOutputsParams


def test_a_schema_is_stored_as_compact_json_text_whether_given_as_dict_or_text() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    from_dict = StructuredOutputsParams(json=schema)
    from_text = StructuredOutputsParams(json=json.dumps(schema, indent=2))
    assert from_dict == from_text
    # Keys keep their order: the grammar generates an object's properties in it.
    assert from_dict.json == json.dumps(schema, separators=(",", ":"))
    assert from_dict.kind == "json"
    hash(SamplingParams(structured_outputs=from_dict))  # frozen params stay hashable


def _deep(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    for _ in range(depth):
        schema = {"not": schema}
    return schema


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one .* got none"),
        ({"regex": "a", "choice": ["a"]}, "exactly one .* got regex, choice"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": "[1, 2]"}, "must be a JSON object"),
        ({"json": 3}, "must be a JSON schema"),
        ({"json": {"default": float("nan")}}, "cannot be written as JSON"),
        ({"json": {"type": object}}, "cannot be written as JSON"),
        ({"json": _deep(100_000)}, "nested too deeply"),  # deeper than Python recurses
        ({"json": '{"not":' * 100_000 + "{}" + "}" * 100_000}, "nested too deeply"),
        ({"regex": ""}, "non-empty str"),
        ({"grammar": 5}, "non-empty str"),
        ({"choice": "yes"}, "list/tuple of str"),
        ({"choice": []}, "must not be empty"),
        ({"choice": ["yes", ""]}, "non-empty str"),
        ({"json_object": 1}, "must be a bool"),
        ({"json_object": True, "disable_any_whitespace": "yes"}, "must be a bool"),
    ],
)
def test_bad_fields_raise_a_typed_error_naming_the_problem(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=message):
        StructuredOutputsParams(**fields)


def test_sampling_params_take_the_params_or_a_dict_of_their_fields() -> None:
    as_dict = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert as_dict.structured_outputs == StructuredOutputsParams(choice=("a", "b"))
    assert SamplingParams().structured_outputs is None
    # vLLM's dicts carry json_object=None when another field is set.
    vllm_shaped = {"regex": "[0-9]+", "json_object": None, "disable_any_whitespace": False}
    assert StructuredOutputsParams.coerce(vllm_shaped) == StructuredOutputsParams(regex="[0-9]+")
    with pytest.raises(InvalidSamplingParamsError, match=r"unknown field.*regexp"):
        SamplingParams(structured_outputs={"regexp": "a"})
    # vLLM's fields medha lacks are taken where they ask for nothing, refused where they do.
    unused = {"whitespace_pattern": None, "disable_fallback": False, "structural_tag": None}
    taken = StructuredOutputsParams.coerce({"choice": ["a"], **unused})
    assert taken == StructuredOutputsParams(choice=("a",))
    for field, value in [("whitespace_pattern", r"\s?"), ("disable_additional_properties", True)]:
        with pytest.raises(InvalidSamplingParamsError, match=f"unknown field.*{field}"):
            StructuredOutputsParams.coerce({"choice": ["a"], field: value})
    with pytest.raises(InvalidSamplingParamsError, match=r"must be a medha\.StructuredOutputs"):
        SamplingParams(structured_outputs="json")  # type: ignore[arg-type]
