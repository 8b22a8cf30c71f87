"""A streamed Responses API request (`"stream": true`): its chat chunks as OpenAI's semantic
events.

Each output item opens (`response.output_item.added`), grows by deltas of its own kind
(`response.reasoning_text.delta`, `response.output_text.delta`,
`response.function_call_arguments.delta`) and closes (`....done`, then
`response.output_item.done`) before the next one opens; the stream starts with
`response.created` and `response.in_progress` and ends with `response.completed` (or
`response.incomplete` when `max_output_tokens` cut it short), which holds the whole response,
the same a request without `stream` gets. Every event has a `sequence_number`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from medha.errors import MedhaError
from medha.log import get_logger
from medha.server.openai_responses import (
    Status,
    function_call_item,
    message_item,
    new_id,
    reasoning_item,
    response_status,
    text_part,
)
from medha.server.streaming import ClosingStreamingResponse, error_body

_log = get_logger(__name__)

Response = Callable[[list[dict[str, Any]], Status, dict[str, Any] | None], dict[str, Any]]
"""Builds the response object from its output items, status and usage (None while going)."""


@dataclass
class _OpenItem:
    kind: str  # "reasoning", "message" or "function_call"
    item_id: str
    text: str = ""
    """The thinking, the answer, or the call's arguments so far."""
    call_id: str = ""
    name: str = ""


class ResponseEvents:
    """One streamed response's events, from its (single) choice's chat chunks."""

    def __init__(
        self,
        response: Response,
        response_usage: Callable[[dict[str, Any], str], dict[str, Any]],
    ) -> None:
        """`response_usage(chat_usage, thinking)`: a response's usage."""
        self._response = response
        self._response_usage = response_usage
        self._sequence = 0
        self._items: list[dict[str, Any]] = []
        self._open: _OpenItem | None = None
        self._finish_reason: str | None = None
        self._thinking = ""

    def start(self) -> list[dict[str, Any]]:
        going = self._response([], "in_progress", None)
        return [
            self._event("response.created", response=going),
            self._event("response.in_progress", response=going),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of a chat chunk; its last (usage, no choices) ends the response."""
        if not chunk["choices"]:
            return self._finish(chunk["usage"])
        choice = chunk["choices"][0]
        self._finish_reason = choice.get("finish_reason") or self._finish_reason
        delta = choice.get("delta") or {}
        events: list[dict[str, Any]] = []
        if delta.get("reasoning"):
            events += self._grow("reasoning", delta["reasoning"])
        if delta.get("content"):
            events += self._grow("message", delta["content"])
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id"):  # a new call
                events += self._close()
                self._open = _OpenItem("function_call", new_id("fc"), "", call["id"])
                self._open.name = function.get("name", "")
                events += self._added()
            if function.get("arguments"):
                events += self._grow("function_call", function["arguments"])
        return events

    def _grow(self, kind: str, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open.kind != kind:
            # A call opens with its id and name (chat sends them before its arguments).
            assert kind != "function_call", "a call's arguments before its name"
            events += self._close()
            self._open = _OpenItem(kind, new_id("rs" if kind == "reasoning" else "msg"))
            events += self._added()
        item = self._open
        assert item is not None
        item.text += delta
        where = {"item_id": item.item_id, "output_index": len(self._items)}
        if kind == "reasoning":
            events.append(
                self._event("response.reasoning_text.delta", **where, content_index=0, delta=delta)
            )
        elif kind == "message":
            events.append(
                self._event(
                    "response.output_text.delta", **where, content_index=0, delta=delta, logprobs=[]
                )
            )
        else:
            events.append(
                self._event("response.function_call_arguments.delta", **where, delta=delta)
            )
        return events

    def _added(self) -> list[dict[str, Any]]:
        item = self._open
        assert item is not None
        index = len(self._items)
        if item.kind == "reasoning":
            going = {**reasoning_item(item.item_id, "", "in_progress"), "content": []}
        elif item.kind == "message":
            going = {**message_item(item.item_id, "", "in_progress"), "content": []}
        else:
            going = function_call_item(item.item_id, item.call_id, item.name, "", "in_progress")
        events = [self._event("response.output_item.added", output_index=index, item=going)]
        if item.kind == "message":
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.item_id,
                    output_index=index,
                    content_index=0,
                    part=text_part(""),
                )
            )
        return events

    def _close(self, last: bool = False) -> list[dict[str, Any]]:
        """Close the open item (`last`: the response's last, incomplete if the output was cut
        short)."""
        item, self._open = self._open, None
        if item is None:
            return []
        status = response_status(self._finish_reason) if last else "completed"
        where = {"item_id": item.item_id, "output_index": len(self._items)}
        events = []
        if item.kind == "reasoning":
            self._thinking += item.text
            done = reasoning_item(item.item_id, item.text, status)
            events.append(
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=item.text
                )
            )
        elif item.kind == "message":
            done = message_item(item.item_id, item.text, status)
            text_done = {"content_index": 0, "text": item.text, "logprobs": []}
            events.append(self._event("response.output_text.done", **where, **text_done))
            part = text_part(item.text)
            events.append(
                self._event("response.content_part.done", **where, content_index=0, part=part)
            )
        else:
            done = function_call_item(item.item_id, item.call_id, item.name, item.text, status)
            arguments = {"arguments": item.text, "name": item.name}
            events.append(
                self._event("response.function_call_arguments.done", **where, **arguments)
            )
        events.append(
            self._event("response.output_item.done", output_index=where["output_index"], item=done)
        )
        self._items.append(done)
        return events

    def _finish(self, chat_usage: dict[str, Any]) -> list[dict[str, Any]]:
        if not self._items and self._open is None:  # nothing written: an empty answer
            self._open = _OpenItem("message", new_id("msg"))
            events = self._added() + self._close(last=True)
        else:
            events = self._close(last=True)
        status = response_status(self._finish_reason)
        usage = self._response_usage(chat_usage, self._thinking)
        whole = self._response(self._items, status, usage)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=whole))
        return events

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return event


async def response_events(
    chat_chunks: AsyncGenerator[dict[str, Any], None], events: ResponseEvents
) -> AsyncGenerator[dict[str, Any], None]:
    for event in events.start():
        yield event
    async with aclosing(chat_chunks) as source:
        async for chunk in source:
            for event in events.chunk(chunk):
                yield event


def response_event_stream(body: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    """Server-sent events as OpenAI sends a response's: `event: TYPE` and `data: {json}` per
    event, no `[DONE]`. An error after the stream began is an `error` event."""

    async def lines() -> AsyncIterator[str]:
        sequence = 0
        try:
            async with aclosing(body) as events:
                async for event in events:
                    sequence = event["sequence_number"] + 1
                    data = json.dumps(event, allow_nan=False)
                    yield f"event: {event['type']}\ndata: {data}\n\n"
        except Exception as error:
            if not isinstance(error, MedhaError):
                _log.exception("stream failed")
            error_ = error_body(error)["error"]
            failure = {"type": "error", "code": error_["type"], "message": error_["message"]}
            failure.update(param=None, sequence_number=sequence)
            yield f"event: error\ndata: {json.dumps(failure)}\n\n"

    return ClosingStreamingResponse(lines(), media_type="text/event-stream")
