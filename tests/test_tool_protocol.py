"""`tool_choice: "required"`'s schema, which puts every tool's parameters into one: each tool's
references must still resolve where they did, and not into another tool's, for the JSON schema
reference validator and for the grammar the output is constrained to."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from medha import GrammarViolationError, StructuredOutputsParams
from medha.server.tool_protocol import ToolDefinition, tool_calling
from tests.engine_support import grammar_compiler

INTEGER_AT_A = {"type": "object", "properties": {"a": {}}, "required": ["a"]}
"""Each case's parameters: `a` must be an integer, by way of the case's reference."""


def _with_a(schema: Any, **more: Any) -> dict[str, Any]:
    return {**INTEGER_AT_A, "properties": {"a": schema}, **more}


CASES = {
    "defs": _with_a({"$ref": "#/$defs/I"}, **{"$defs": {"I": {"type": "integer"}}}),
    "old definitions": _with_a({"$ref": "#/definitions/I"}, definitions={"I": {"type": "integer"}}),
    "root": {  # "#" is the tool's parameters, not the whole schema
        "type": "object",
        "properties": {"a": {"type": "integer"}, "next": {"$ref": "#"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "anchor": _with_a({"$ref": "#int"}, **{"$defs": {"I": {"$anchor": "int", "type": "integer"}}}),
    "own id": _with_a(
        {"$ref": "#/$defs/I"}, **{"$id": "params", "$defs": {"I": {"type": "integer"}}}
    ),
    "inner id": _with_a({"$ref": "n"}, **{"$defs": {"N": {"$id": "n", "type": "integer"}}}),
}
VALID = {"defs": {"a": 1}, "old definitions": {"a": 1}, "root": {"a": 1, "next": {"a": 2}}}
INVALID = {"defs": {"a": "x"}, "old definitions": {"a": "x"}, "root": {"a": 1, "next": {"a": "x"}}}


def _required_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    # Other tools first, whose $defs, anchor and $ids have the case's names, with strings
    # where the case has integers: the case's are neither the root's nor another tool's.
    named = {
        "type": "object",
        "$id": "params",
        "$defs": {"I": {"type": "string"}, "N": {"$id": "n", "type": "string"}},
        "properties": {},
    }
    anchored = {"type": "object", "$defs": {"I": {"type": "string", "$anchor": "int"}}}
    tools = [
        ToolDefinition.model_validate({"type": "function", "function": function})
        for function in (
            {"name": "named", "parameters": named},
            {"name": "anchored", "parameters": anchored},
            {"name": "f", "parameters": parameters},
        )
    ]
    calling = tool_calling(tools, "required", parallel=True, parser=None)
    assert calling is not None and calling.schema is not None
    return calling.schema


def _grammar_accepts(schema: dict[str, Any], value: object) -> bool:
    matcher = grammar_compiler().matcher(
        StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    )
    text = json.dumps(value, separators=(",", ":"))
    try:
        for token in grammar_compiler()._tokenizer.encode(text, add_special_tokens=False):
            matcher.accept(token)
    except GrammarViolationError:
        return False
    return bool(matcher._matcher.is_accepting())


@pytest.mark.parametrize("case", CASES)
def test_required_keeps_each_tools_references(case: str) -> None:
    schema = _required_schema(CASES[case])
    valid = [{"name": "f", "parameters": VALID.get(case, {"a": 1})}]
    invalid = [{"name": "f", "parameters": INVALID.get(case, {"a": "x"})}]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert jsonschema.Draft202012Validator(schema).is_valid(valid)
    assert not jsonschema.Draft202012Validator(schema).is_valid(invalid)
    assert _grammar_accepts(schema, valid)
    assert not _grammar_accepts(schema, invalid)


def test_data_in_a_schema_is_not_moved() -> None:
    # "$ref" as a property's name, or inside a const's value, is data, not a reference; a
    # property named as a keyword ("default") is a schema, whose reference moves.
    data = {
        "$ref": {"type": "integer"},
        "b": {"const": {"$ref": "#/x"}},
        "c": {"enum": [{"$ref": "#"}]},
    }
    parameters = {
        "type": "object",
        "properties": {**data, "default": {"$ref": "#/$defs/I"}},
        "required": ["$ref", "b", "c", "default"],
        "$defs": {"I": {"type": "integer"}},
    }
    schema = _required_schema(parameters)
    moved = schema["$defs"]["tool_2"]["properties"]
    assert {key: moved[key] for key in data} == data
    arguments = {"$ref": 1, "b": {"$ref": "#/x"}, "c": {"$ref": "#"}, "default": 2}
    call = [{"name": "f", "parameters": arguments}]
    wrong = [{"name": "f", "parameters": {**arguments, "default": "x"}}]
    assert jsonschema.Draft202012Validator(schema).is_valid(call)
    assert not jsonschema.Draft202012Validator(schema).is_valid(wrong)
    assert _grammar_accepts(schema, call)
    assert not _grammar_accepts(schema, wrong)
