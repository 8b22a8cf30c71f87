"""OpenAI's Responses API (`POST /v1/responses`), as a chat completion underneath.

Agent frameworks (OpenAI's Agents SDK, Codex) speak it rather than chat completions. A request
becomes the chat request it means: `instructions` a system message, `input` the messages (a
`function_call` item an assistant message's tool call, a `function_call_output` item a tool
message), `tools` and `tool_choice` flattened as chat has them, `text.format` the
`response_format`, `max_output_tokens` the output limit; vLLM's extra sampling fields pass
through. The chat's choice becomes the response's output items: the thinking (with a
reasoning parser) a `reasoning` item, the answer a `message`, each tool call a
`function_call`.

Medha keeps no state between requests (OpenAI's `store`): a request that refers to an earlier
response (`previous_response_id`, an `item_reference`) is refused, and the client sends the
whole conversation each time, as the Agents SDK does by default.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from medha.errors import InvalidRequestError
from medha.server.protocol import null_is_the_default

_NOT_KEPT = {
    # field: the value that means "not used" (anything else is refused)
    "previous_response_id": None,
    "conversation": None,
    "background": False,
    "prompt": None,
}
"""Fields that need a response store or a server-side prompt, which medha does not keep."""

_CHAT_ONLY: dict[str, object] = {
    # field: the value that means "not used" (anything else is refused)
    "messages": None,
    "n": 1,
    "echo": False,
    "logprobs": False,
    "prompt_logprobs": None,
    "response_format": None,
    "max_tokens": None,
    "max_completion_tokens": None,
    "best_of": 1,
    # A response has every item of the chat's output: the thinking's too, counted in usage.
    "include_reasoning": True,
}
"""Chat's and completions' own fields, which the Responses API has in its own way (`input`,
`text.format`, `max_output_tokens`) or not at all (one output, no logprobs)."""

_TAKEN_UNUSED = ("include", "service_tier", "stream_options")
"""OpenAI's fields that change nothing medha does (not logged as ignored: OpenAI's clients send
them routinely)."""

_NO_CALL = ("auto", "none")
"""Tool choices that ask for no call: without tools, they say nothing (OpenAI's default is
"auto", tools or not)."""

_RESPONSE_FIELDS = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "reasoning",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "user",
)
"""The request's fields a response repeats (OpenAI's response object has them)."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Fields beyond these are vLLM's sampling extras (seed, top_k, stop,
    structured_outputs, ...), passed to the chat request, or logged and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    _defaults = field_validator("stream", mode="before")(classmethod(null_is_the_default))
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    """"auto": a conversation too long for the context loses its oldest turns until it fits
    (medha.server.responses_truncation); else ("disabled", OpenAI's default) it is refused."""

    def chat_body(self) -> dict[str, Any]:
        """The chat completions request this one means (validated by its model after)."""
        extra = self.model_extra or {}
        for name, unused in _NOT_KEPT.items():
            if extra.get(name, unused) not in (unused, None):
                raise InvalidRequestError(
                    f"{name} is not supported: medha keeps no responses or prompts between "
                    "requests (send the whole conversation in `input`)"
                )
        if self.top_logprobs:
            raise InvalidRequestError("top_logprobs is not supported by medha's /v1/responses")
        for name, not_used in _CHAT_ONLY.items():
            if extra.get(name, not_used) not in (not_used, None):
                raise InvalidRequestError(
                    f"{name} is chat's, not a field of the Responses API (which takes vLLM's "
                    "sampling extras, not chat's own fields)"
                )
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise InvalidRequestError(
                f"max_output_tokens must be >= 1, got {self.max_output_tokens}"
            )
        passed = {
            name: value
            for name, value in extra.items()
            if name not in _NOT_KEPT and name not in _TAKEN_UNUSED
        }
        body: dict[str, Any] = {**passed, "model": self.model, "messages": self._messages()}
        body.update(temperature=self.temperature, top_p=self.top_p, stream=self.stream)
        body["max_completion_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [_chat_tool(tool) for tool in self.tools]
        if self.tool_choice is not None and (self.tools or self.tool_choice not in _NO_CALL):
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.text is not None and self.text.get("format") is not None:
            body["response_format"] = _response_format(self.text["format"])
        return body

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            _add_item(messages, item)
        if not messages:
            raise InvalidRequestError("input is empty")
        return messages

    def echoed_fields(self, sampling_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a response repeats of its request (OpenAI's defaults where it sent none; the
        model's `sampling_defaults`, Engine.sampling_defaults, for its sampling)."""
        fields = {name: getattr(self, name) for name in _RESPONSE_FIELDS}
        fields["tools"] = fields["tools"] or []
        fields["tool_choice"] = fields["tool_choice"] or "auto"
        fields["parallel_tool_calls"] = fields["parallel_tool_calls"] is not False
        fields["text"] = fields["text"] or {"format": {"type": "text"}}
        fields["metadata"] = fields["metadata"] or {}
        for name in ("temperature", "top_p"):
            if fields[name] is None:
                fields[name] = (sampling_defaults or {}).get(name, 1.0)
        return fields


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any]) -> None:
    """Append an input item to the chat messages (a tool call joins the assistant message
    before it, as chat has several calls in one message)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequestError(
                f"an input message's role must be user, system, "
                f"developer or assistant, got {role!r}"
            )
        # Open models' chat templates know no "developer" role: it is OpenAI's system.
        chat_role = "system" if role == "developer" else role
        messages.append({"role": chat_role, "content": _content(item.get("content"))})
    elif kind == "function_call":
        call = {
            "id": _field(item, "call_id"),
            "type": "function",
            "function": {"name": _field(item, "name"), "arguments": _field(item, "arguments")},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        elif last is not None and last["role"] == "assistant":
            last["tool_calls"] = [call]
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else _content(output, "a function's output")
        messages.append(
            {"role": "tool", "tool_call_id": _field(item, "call_id"), "content": content}
        )
    elif kind == "reasoning":
        pass  # earlier thinking: chat templates drop it from the history too
    else:
        raise InvalidRequestError(
            f"input items of type {kind!r} are not supported (medha takes message, "
            "function_call, function_call_output and reasoning items)"
        )


def _field(item: dict[str, Any], name: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"a {item.get('type')} input item needs a string `{name}`")
    return value


def _content(
    content: object, what: str = "an input message's content"
) -> str | list[dict[str, Any]]:
    """An input message's content (or `what`) as chat's: text, or text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{what} must be a string or a list of text parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise InvalidRequestError(
                f"content parts of type {kind!r} are not supported (medha's models read text)"
            )
        parts.append({"type": "text", "text": part.get("text", "")})
    return parts


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidRequestError(
            f"tools of type {tool.get('type')!r} are not supported (medha runs no built-in "
            "tools; give functions)"
        )
    function = {key: value for key, value in tool.items() if key != "type"}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequestError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}'
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text_format: object) -> dict[str, Any]:
    if not isinstance(text_format, dict):
        raise InvalidRequestError(
            f"text.format must be an object with a type (text, json_object, json_schema), "
            f"got {type(text_format).__name__}"
        )
    kind = text_format.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = {key: value for key, value in text_format.items() if key != "type"}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(
        f"text.format of type {kind!r} is not supported (text, json_object, json_schema)"
    )


Status = Literal["completed", "incomplete", "in_progress"]


def response_object(
    response_id: str,
    model: str,
    request: ResponsesRequest,
    output: list[dict[str, Any]],
    status: Status,
    usage: dict[str, Any] | None,
    created_at: int | None = None,
    sampling_defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenAI's response object (`sampling_defaults`: see ResponsesRequest.echoed_fields)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()) if created_at is None else created_at,
        "status": status,
        "error": None,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "model": model,
        "output": output,
        **request.echoed_fields(sampling_defaults),
        "previous_response_id": None,
        "store": False,
        "truncation": request.truncation or "disabled",
        "usage": usage,
    }


def output_items(message: dict[str, Any], finish_reason: str | None) -> list[dict[str, Any]]:
    """A chat choice's message as a response's output items (the last one is incomplete when
    max_output_tokens cut it short)."""
    status = response_status(finish_reason)
    items = []
    content = message.get("content")
    calls = message.get("tool_calls") or []
    if message.get("reasoning"):
        alone = not (content or calls)  # the last item then (cut short while thinking)
        thinking_status = status if alone else "completed"
        items.append(reasoning_item(new_id("rs"), message["reasoning"], thinking_status))
    if content or not (items or calls):
        last = not calls
        items.append(message_item(new_id("msg"), content or "", status if last else "completed"))
    for index, call in enumerate(calls):
        function = call["function"]
        last = index == len(calls) - 1
        item = function_call_item(new_id("fc"), call["id"], function["name"], function["arguments"])
        items.append({**item, "status": status if last else "completed"})
    return items


def reasoning_item(item_id: str, text: str, status: Status = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def message_item(item_id: str, text: str, status: Status) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [text_part(text)],
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: Status = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_usage(
    chat_usage: dict[str, Any], reasoning_tokens: int, cache_block: int
) -> dict[str, Any]:
    """A chat usage object as a response's. `reasoning_tokens`: the thinking's text encoded
    again (which may give a token more than the model wrote: no more than the output's).
    `cache_block`: the tokens of a KV block, which the prefix cache keeps whole (0: no prefix
    cache); the prompt's whole blocks that were not cached are what it wrote to the cache
    (the scheduler always computes a prompt's last token, so a cached last block of a prompt
    that ends on a block boundary is computed again, and counted)."""
    details = chat_usage.get("prompt_tokens_details") or {}
    input_tokens, cached = chat_usage["prompt_tokens"], details.get("cached_tokens", 0)
    written = max(0, input_tokens // cache_block * cache_block - cached) if cache_block else 0
    output_tokens = chat_usage["completion_tokens"]
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, output_tokens)},
        "total_tokens": chat_usage["total_tokens"],
    }


def response_status(finish_reason: str | None) -> Status:
    return "incomplete" if finish_reason == "length" else "completed"
