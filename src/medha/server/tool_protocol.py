"""OpenAI's `tools` and `tool_choice` on a chat request: what the model is shown, and how its
output is constrained and read.

The tools go to the chat template (`apply_chat_template(..., tools=...)`, as transformers and
vLLM pass them), which writes them into the prompt in the model's own format. Then, by
`tool_choice`:

- a named function (`{"type": "function", "function": {"name": ...}}`): the output is
  constrained to the function's `parameters` schema (medha.structured_outputs) and is the call's
  arguments: a valid call of any model, with no parser;
- `"required"`: the output is constrained to a JSON array of one or more `{"name",
  "parameters"}` objects, one of the tools each (one at most with `parallel_tool_calls: false`);
- `"auto"` (the default when tools are given): the model writes text or calls in its own
  format, which the server's parser (medha.server.tool_parsers) reads; without a parser it is
  refused, as vLLM refuses it without `--enable-auto-tool-choice`;
- `"none"`: the tools are shown and the output is plain text.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from medha.errors import InvalidRequestError
from medha.server.tool_calls import ToolCalling
from medha.server.tool_parsers import ToolCallParser


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments (an object); None: no arguments are described."""
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: call this function."""

    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | None


def tool_calling(
    tools: list[ToolDefinition] | None,
    choice: ToolChoice,
    parallel: bool,
    parser: ToolCallParser | None,
) -> ToolCalling | None:
    """How a request's output becomes tool calls; None when it stays text (no tools, or
    `tool_choice: "none"`). InvalidRequestError for a choice its tools cannot meet."""
    if not tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice needs tools")
        return None
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        raise InvalidRequestError(f"tools must have different names, got {names}")
    for tool in tools:
        _parameters(tool.function)  # an object schema, whatever the choice (as OpenAI checks)
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return None
    if choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                'tool_choice "auto" needs a tool-call parser, which this server was started '
                'without (medha serve --tool-call-parser hermes|llama3_json); "required" or a '
                "named function needs none"
            )
        return ToolCalling("auto", parser=parser, parallel=parallel, names=frozenset(names))
    if choice == "required":
        return ToolCalling("required", schema=_required_schema(tools, parallel), parallel=parallel)
    by_name = {tool.function.name: tool.function for tool in tools}
    function = by_name.get(choice.function.name)
    if function is None:
        raise InvalidRequestError(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools"
        )
    schema = _parameters(function)
    return ToolCalling("named", schema=schema, function=function.name, parallel=parallel)


def _parameters(function: FunctionDefinition) -> dict[str, Any]:
    """The schema of `function`'s arguments, which are a JSON object (OpenAI's `arguments`
    is one): `{}` or none allows any object."""
    parameters = function.parameters or {}
    kind = parameters.get("type", "object")
    if kind != "object":
        raise InvalidRequestError(
            f"the parameters of {function.name!r} must be an object schema, got type {kind!r}"
        )
    return {**parameters, "type": "object"}


def _required_schema(tools: list[ToolDefinition], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls, each `{"name": one of the tools, "parameters": its arguments}`
    (the shape vLLM constrains `"required"` to). Each tool's schema moves under the root's
    `$defs`, as a resource of its own: its references point where they pointed."""
    definitions = {}
    calls = []
    for index, tool in enumerate(tools):
        key = f"tool_{index}"
        definitions[key] = _own_resource(_parameters(tool.function), index)
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": {"$ref": f"#/$defs/{key}"},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,  # nothing else for the model to spend tokens on
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    schema["$defs"] = definitions
    return schema


_TOOL_BASE = "https://medha.invalid/tools/"
"""Where each tool's schema lives, as a resource of the one schema of `"required"` (a URI
of nothing: it names, and is never fetched)."""


def _own_resource(schema: dict[str, Any], index: int) -> dict[str, Any]:
    """`schema` as a resource of its own: with a `$id` of its own, which its references
    resolve against (`#`, `#/$defs/...`, its anchors, the `$id`s inside it), so that no two
    tools' references or anchors meet. A `$id` it had is replaced."""
    return {**schema, "$id": f"{_TOOL_BASE}{index}/"}


def template_tools(tools: list[ToolDefinition] | None) -> list[dict[str, Any]] | None:
    """The tools as the chat template takes them (OpenAI's JSON, which transformers passes)."""
    if not tools:
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]
