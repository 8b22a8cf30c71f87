"""A chat choice's output as OpenAI's tool calls: whole (`message.tool_calls`) or streamed
(`delta.tool_calls`).

A named function's output is its arguments, streamed as the model writes them. `"required"`
and `"auto"` outputs are read when the choice ends: "required" is a JSON array of calls, and
"auto" text the parser reads. Streamed, the text an "auto" parser says cannot be a call goes
out as content at once, and what may be a call waits for the end, to go out as the calls (or
as content, if it was none): clients that add up the deltas (OpenAI's, LangChain's) get what
a whole response holds. The finish reason is "tool_calls" when calls were made (as OpenAI's
and vLLM's; a named function's choice keeps "stop", as OpenAI's does).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from medha.server.tool_parsers import (
    FunctionCall,
    ParsedOutput,
    ToolCallParser,
    decode_json,
    read_call,
)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_json(call: FunctionCall, index: int | None = None) -> dict[str, Any]:
    """A whole tool call, as a message's (with `index`, as a stream delta's)."""
    function = {"name": call.name, "arguments": call.arguments}
    whole = {"id": call_id(), "type": "function", "function": function}
    return whole if index is None else {"index": index, **whole}


@dataclass(frozen=True)
class ToolCalling:
    """How a request's output becomes tool calls (medha.server.tool_protocol builds it)."""

    choice: Literal["named", "required", "auto"]
    schema: dict[str, Any] | None = None
    """The JSON schema the output is constrained to (named and required)."""
    function: str | None = None
    """The named function."""
    parser: ToolCallParser | None = None
    """auto's parser."""
    parallel: bool = True
    """False: one call at most (OpenAI's `parallel_tool_calls`)."""
    names: frozenset[str] = frozenset()
    """The tools' names: auto output calling any other function calls nothing (its text is
    the content), as a model answering in JSON that has a "name" key has not called a tool."""

    def parse(self, text: str) -> ParsedOutput:
        """A finished output's content and calls."""
        if self.choice == "named":
            assert self.function is not None
            return ParsedOutput(None, (FunctionCall(self.function, text),))
        if self.choice == "required":
            parsed = _required_calls(text)
        else:
            assert self.parser is not None
            parsed = self.parser.extract(text)
            if any(call.name not in self.names for call in parsed.calls):
                return ParsedOutput(text, ())
        if not self.parallel and len(parsed.calls) > 1:
            return ParsedOutput(parsed.content, parsed.calls[:1])
        return parsed

    def finish_reason(self, reason: str | None, parsed: ParsedOutput) -> str | None:
        if reason is None or self.choice == "named" or not parsed.calls:
            return reason
        # "required" cut short (length) is not a call; its text is returned as content.
        return "tool_calls"

    def message(self, text: str) -> tuple[dict[str, Any], ParsedOutput]:
        """A whole response's message of `text`, and what was read from it."""
        parsed = self.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [call_json(call) for call in parsed.calls]
        return message, parsed


def _required_calls(text: str) -> ParsedOutput:
    """The calls of a `"required"` output (`[{"name": ..., "parameters": {...}}, ...]`); a
    choice cut short is not one: its text is the content."""
    body = text.strip()
    try:
        items, end = decode_json(body)
    except ValueError:
        return ParsedOutput(text, ())
    if not isinstance(items, list) or not items or end != len(body):
        return ParsedOutput(text, ())
    calls = [read_call(item, "parameters") for item in items]
    if None in calls:
        return ParsedOutput(text, ())
    return ParsedOutput(None, tuple(call for call in calls if call is not None))


@dataclass
class ToolCallStream:
    """One streamed choice's progress: what of its text has gone out, and how."""

    calling: ToolCalling
    sent: int = 0
    """Characters of the output text sent (as content, or as a named call's arguments)."""
    parsed: ParsedOutput | None = None
    """What was read when the choice ended."""
    _named_started: bool = False

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        """The delta for the output `text` so far (empty: nothing to say yet)."""
        if self.calling.choice == "named":
            return self._arguments(text, finished)
        if not finished:
            held = 0 if self.calling.choice == "required" else self._held_from(text)
            new, self.sent = text[self.sent : max(held, self.sent)], max(held, self.sent)
            return {"content": new} if new else {}
        self.parsed = self.calling.parse(text)
        delta: dict[str, Any] = {}
        if not self.parsed.calls:
            rest = text[self.sent :]
            return {"content": rest} if rest else {}
        # What was sent is the start of the content (the parser held back all it may read).
        content = self.parsed.content or ""
        if len(content) > self.sent:
            delta["content"] = content[self.sent :]
        delta["tool_calls"] = [call_json(call, i) for i, call in enumerate(self.parsed.calls)]
        return delta

    def _held_from(self, text: str) -> int:
        assert self.calling.parser is not None
        return self.calling.parser.held_from(text)

    def _arguments(self, text: str, finished: bool) -> dict[str, Any]:
        if finished:
            self.parsed = self.calling.parse(text)
        new, self.sent = text[self.sent :], len(text)
        if not self._named_started:
            if not (new or finished):
                return {}  # no answer yet (a reasoning model may still be thinking)
            # The call's name and id come on its first delta, as OpenAI's do.
            self._named_started = True
            function = {"name": self.calling.function, "arguments": new}
            return {
                "tool_calls": [
                    {"index": 0, "id": call_id(), "type": "function", "function": function}
                ]
            }
        return {"tool_calls": [{"index": 0, "function": {"arguments": new}}]} if new else {}
