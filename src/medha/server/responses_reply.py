"""A Responses API request's reply (medha.server.openai_responses), whole or streamed, from its
started chat choice."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from medha.engine import Engine
from medha.server.openai_responses import (
    ResponsesRequest,
    Status,
    new_id,
    output_items,
    response_object,
    response_status,
    response_usage,
)
from medha.server.responses import usage
from medha.server.responses_stream import ResponseEvents, response_event_stream, response_events
from medha.server.streaming import Started, chunks, collect, until_disconnected


async def responses_reply(
    request: Request,
    body: ResponsesRequest,
    started: Started,
    model_name: str,
    engine: Engine,
) -> Response:
    """The response object, or (`stream`) its events."""
    response_id, created = new_id("resp"), int(time.time())
    tokenizer, config = engine.tokenizer, engine.config
    cache_block = config.block_size if config.enable_prefix_caching else 0

    def response(items: list[dict[str, Any]], status: Status, used: Any) -> dict[str, Any]:
        return response_object(
            response_id, model_name, body, items, status, used, created, engine.sampling_defaults
        )

    def response_usage_of(chat_usage: dict[str, Any], thinking: str) -> dict[str, Any]:
        thinking_tokens = len(tokenizer.encode(thinking, add_special_tokens=False))
        return response_usage(chat_usage, thinking_tokens, cache_block)

    if body.stream:
        events = ResponseEvents(response, response_usage_of)
        chat_chunks = chunks(
            started.head, started.choices, started.render, True, started.prompt_tokens
        )
        return response_event_stream(response_events(chat_chunks, events))
    outputs = await until_disconnected(request, lambda: collect(started.choices, started.render))
    ((output, choice),) = zip(outputs, started.choices, strict=True)
    rendered = started.render.whole(output, choice.prompt_ids)
    message, finish = rendered["message"], rendered["finish_reason"]
    used = response_usage_of(usage(outputs, started.prompt_tokens), message.get("reasoning") or "")
    return JSONResponse(response(output_items(message, finish), response_status(finish), used))
