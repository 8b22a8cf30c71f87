"""Earlier tool calls in a chat's history, as chat templates take them.

OpenAI's clients send an assistant message's calls with their arguments as JSON text;
templates (Llama 3.1's, Qwen's) write the arguments with `tojson`, and JSON text would come out
quoted. So the arguments are decoded first, as vLLM does, for every way a chat reaches a
template (the server, LLM.chat).
"""

from __future__ import annotations

import json
from typing import Any

from medha.errors import InvalidRequestError


def calls_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each earlier call's arguments as an object: OpenAI sends them as JSON
    text, and chat templates (Llama 3.1's, Qwen's) write them with `tojson`, which would quote
    the text again. As vLLM's: no arguments ("" or null) is {}, and no calls ([]) none."""
    result = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is None:
            result.append(message)
            continue
        if not isinstance(calls, list):
            raise InvalidRequestError(f"messages[{index}].tool_calls must be a list")
        if not calls:  # a template could still iterate an empty list, or refuse it
            result.append({key: value for key, value in message.items() if key != "tool_calls"})
            continue
        converted = []
        for number, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequestError(
                    f"messages[{index}].tool_calls[{number}] must have a function with a name"
                )
            arguments = function.get("arguments")
            if arguments is None or arguments == "":  # a call of no arguments (as vLLM)
                arguments = {}
            elif isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except (ValueError, RecursionError) as exc:  # ValueError: also huge ints
                    raise InvalidRequestError(
                        f"messages[{index}].tool_calls[{number}].function.arguments is not "
                        f"JSON: {exc}"
                    ) from exc
            converted.append({**call, "function": {**function, "arguments": arguments}})
        result.append({**message, "tool_calls": converted})
    return result
