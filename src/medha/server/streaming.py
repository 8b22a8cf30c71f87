"""Delivering a request's choices: whole (aborted if the client disconnects first) or as
server-sent events (ended by an error event if the engine ends them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from medha.errors import EngineClosedError, EngineFailedError, InvalidRequestError, MedhaError
from medha.log import get_logger
from medha.server.choices import Choice, merged_events
from medha.server.responses import ChoiceOutput, Renderer, so_far, usage

_log = get_logger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Started:
    """A request's choices, started in the engine, and how to write their output."""

    choices: list[Choice]
    render: Renderer
    head: dict[str, Any]
    """What every chunk (or the whole response) starts with: id, object, created, model."""
    prompt_tokens: list[int]


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve."""


class ClientDisconnectedError(Exception):
    """The client went away before its response was ready."""


def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an error."""
    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error"
    if isinstance(error, InvalidRequestError):
        return 400, "invalid_request_error"
    if isinstance(error, EngineClosedError | EngineFailedError):
        return 503, "server_error"
    return 500, "server_error"


def error_body(error: BaseException) -> dict[str, Any]:
    """OpenAI's error object; an error medha did not raise on purpose says only that."""
    status, kind = status_of(error)
    message = str(error) if isinstance(error, MedhaError) else "internal error (see the log)"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


async def collect(choices: list[Choice], render: Renderer) -> list[ChoiceOutput]:
    """Every choice, streamed to its end."""
    outputs = [ChoiceOutput(c.index, echo=c.echo, token_text=render.strings.shown) for c in choices]
    async with aclosing(merged_events(choices)) as events:
        async for index, event in events:
            outputs[index].add(event)
    return outputs


async def until_disconnected(request: Request, work: Callable[[], Awaitable[_T]]) -> _T:
    """`work()`'s result; cancelled (its requests aborted) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            raise ClientDisconnectedError(request.url.path)
        return job.result()
    finally:
        job.cancel()
        watch.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)


async def chunks(
    head: dict[str, Any],
    choices: list[Choice],
    render: Renderer,
    include_usage: bool,
    prompt_tokens: list[int],
    continuous_usage: bool = False,
) -> AsyncGenerator[dict[str, Any], None]:
    """A streamed response's chunks: a chat's role chunks first (and its echo's), then one
    per event that says something; with `include_usage`, a last chunk of token counts, and
    with `continuous_usage` each choice's counts so far on each of its chunks (vLLM's)."""
    outputs = {
        c.index: ChoiceOutput(c.index, echo=c.echo, token_text=render.strings.shown)
        for c in choices
    }
    prompts = {c.index: c.prompt_ids for c in choices}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        if not continuous_usage:
            return {**head, "choices": [choice]}
        index = choice["index"]
        return {**head, "choices": [choice], "usage": so_far(outputs[index], prompts[index])}

    for starts in (render.role, render.echo_chunk):
        for choice in choices:
            if (first := starts(choice.index)) is not None:
                yield chunk(first)
    async with aclosing(merged_events(choices)) as events:
        async for index, event in events:
            outputs[index].add(event)
            delta = render.delta(outputs[index], event, prompts[index])
            if delta is not None:
                yield chunk(delta)
    if include_usage:
        yield {**head, "choices": [], "usage": usage(list(outputs.values()), prompt_tokens)}


def event_stream(body: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    """Server-sent events: a `data: {json}` line per chunk, then `data: [DONE]`. An error after
    the stream began (the engine stopped or failed, a grammar violation) is sent as an
    `error` object before `[DONE]`."""

    async def lines() -> AsyncIterator[str]:
        try:
            async with aclosing(body) as chunks_:
                async for chunk in chunks_:
                    yield f"data: {json.dumps(chunk, allow_nan=False)}\n\n"
        except Exception as error:
            if not isinstance(error, MedhaError):
                _log.exception("stream failed")
            yield f"data: {json.dumps(error_body(error))}\n\n"
        yield "data: [DONE]\n\n"

    return ClosingStreamingResponse(lines(), media_type="text/event-stream")


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body when it ends however it ends: Starlette leaves
    a body interrupted inside `send` (a client gone, a server's shutdown) to the garbage
    collector, and with it the abort of the body's requests."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
