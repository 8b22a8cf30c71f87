"""An OpenAI-compatible HTTP API over a running Engine (FastAPI).

    async with medha.Engine(config) as engine:
        app = create_app(engine)          # mount it in a service, or: medha serve MODEL

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`stream: true`), GET /v1/models, /health and /stats. The app does not own the engine: whoever
started it stops it, after the server. A client that disconnects aborts its requests, streamed
or not, and frees their KV cache. Errors have OpenAI's shape ({"error": {"message", "type",
"param", "code"}}): a request medha refuses (medha.errors.InvalidRequestError, or a body of the
wrong shape) is a 400 before anything is queued.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from medha.engine import Engine
from medha.errors import (
    EngineClosedError,
    EngineFailedError,
    InvalidRequestError,
    MedhaError,
)
from medha.log import get_logger
from medha.server.choices import Choice, merged_events, sole_error, start_choices
from medha.server.protocol import ChatCompletionRequest, CompletionRequest
from medha.server.responses import (
    ChoiceOutput,
    Rows,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    logprob_rows,
    metrics_json,
    prompt_logprobs_json,
    usage,
)

_log = get_logger(__name__)
_T = TypeVar("_T")


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve."""


class ClientDisconnectedError(Exception):
    """The client went away before its response was ready."""


def create_app(engine: Engine, served_model_name: str | None = None) -> FastAPI:
    """The API of `engine` (started, on this event loop), serving it as `served_model_name`
    (default: EngineConfig.model)."""
    api = _Api(engine, served_model_name or engine.config.model)
    app = FastAPI(title="medha", summary="OpenAI-compatible API of a medha Engine")
    app.add_exception_handler(MedhaError, _medha_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnectedError, _disconnected)  # type: ignore[arg-type]
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/stats", api.stats, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], response_model=None)
    app.add_api_route(
        "/v1/chat/completions", api.chat_completions, methods=["POST"], response_model=None
    )
    return app


class _Api:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        self.strings = TokenStrings(engine.tokenizer)

    async def health(self) -> JSONResponse:
        try:
            self.engine.stats()
        except MedhaError as exc:
            return _error(503, str(exc), "server_error")
        return JSONResponse({"status": "ok"})

    async def stats(self) -> dict[str, Any]:
        return asdict(self.engine.stats())

    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "medha",
                    "max_model_len": self.engine.max_model_len,
                }
            ],
        }

    async def completions(
        self, body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        self._check(body, request)
        body.check_supported()
        prompts = body.prompts()
        body.check_choices(len(prompts))
        params = body.sampling_params(body.max_tokens, body.logprobs, body.prompt_logprobs)
        prompt_ids = [self.engine.tokenize(prompt, params) for prompt in prompts]
        response_id = request.headers.get("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        choices = start_choices(self.engine, prompt_ids, params, body.n, body.deadline, response_id)
        head = {"id": response_id, "object": "text_completion", "created": int(time.time())}
        head["model"] = self.model_name
        if body.stream:
            table = None
            if params.logprobs is not None:
                table = partial(completion_logprobs, strings=self.strings)
            chunks = _chunks(
                head,
                choices,
                lambda text: {"text": text},
                table,
                body.wants_usage,
                [len(p) for p in prompt_ids],
            )
            return _event_stream(chunks)
        outputs = await _until_disconnected(request, lambda: _collect(choices))
        rendered = []
        for output, choice in zip(outputs, choices, strict=True):
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(
                    logprob_rows(output), output.text_offsets, self.strings
                )
            rendered.append(
                {
                    "index": output.index,
                    "text": output.text,
                    "logprobs": logprobs,
                    "finish_reason": output.finish_reason,
                    "prompt_logprobs": prompt_logprobs_json(
                        output, choice.prompt_ids, self.strings
                    ),
                    "metrics": metrics_json(output.metrics),
                }
            )
        return JSONResponse(
            {**head, "choices": rendered, "usage": usage(outputs, [len(p) for p in prompt_ids])}
        )

    async def chat_completions(
        self, body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        self._check(body, request)
        body.check_supported()
        body.check_choices(1)
        params = body.sampling_params(body.output_limit(), body.logprob_count())
        tokenizer = self.engine.tokenizer
        if not tokenizer.has_chat_template:
            raise InvalidRequestError(f"the model `{self.model_name}` has no chat template")
        templated = tokenizer.apply_chat_template(body.messages, body.add_generation_prompt)
        prompt_ids = self.engine.tokenize(templated, params)
        response_id = request.headers.get("x-request-id") or f"chatcmpl-{uuid.uuid4().hex}"
        choices = start_choices(
            self.engine, [prompt_ids], params, body.n, body.deadline, response_id
        )
        head = {"id": response_id, "object": "chat.completion", "created": int(time.time())}
        head["model"] = self.model_name
        if body.stream:
            head["object"] = "chat.completion.chunk"

            def table(rows: Rows, _offsets: list[int]) -> dict[str, Any]:
                return chat_logprobs(rows, self.strings)

            chunks = _chunks(
                head,
                choices,
                lambda text: {"delta": {"content": text} if text else {}},
                None if params.logprobs is None else table,
                body.wants_usage,
                [len(prompt_ids)],
            )
            return _event_stream(_after_roles(head, choices, chunks))
        outputs = await _until_disconnected(request, lambda: _collect(choices))
        rendered = [
            {
                "index": output.index,
                "message": {"role": "assistant", "content": output.text},
                "logprobs": (
                    None
                    if params.logprobs is None
                    else chat_logprobs(logprob_rows(output), self.strings)
                ),
                "finish_reason": output.finish_reason,
                "metrics": metrics_json(output.metrics),
            }
            for output in outputs
        ]
        return JSONResponse(
            {**head, "choices": rendered, "usage": usage(outputs, [len(prompt_ids)])}
        )

    def _check(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ModelNotFoundError(f"The model `{body.model}` does not exist.")
        ignored = body.ignored_fields()
        if ignored:
            _log.info("request fields ignored", path=request.url.path, fields=ignored)


async def _chunks(
    head: dict[str, Any],
    choices: list[Choice],
    text: Callable[[str], dict[str, Any]],
    logprobs: Callable[[Rows, list[int]], dict[str, Any]] | None,
    include_usage: bool,
    prompt_tokens: list[int],
) -> AsyncIterator[dict[str, Any]]:
    """A streamed response's chunks: one per event that says something, with its text's
    fields (`text`), its token's logprobs (`logprobs` of its row and its text offset, if asked
    for), the finish reason and metrics on a choice's last; with `include_usage`, a last chunk
    of token counts."""
    outputs = {c.index: ChoiceOutput(c.index) for c in choices}
    async for index, event in merged_events(choices):
        output = outputs[index]
        output.add(event)
        if not (event.text or event.finish_reason or (logprobs and event.token_id is not None)):
            continue  # text held back (a stop string may be starting): nothing to say yet
        choice: dict[str, Any] = {"index": index, **text(event.text), "logprobs": None}
        if logprobs is not None and event.token_id is not None:
            row = [(event.token_id, event.logprob, event.top_logprobs)]
            choice["logprobs"] = logprobs(row, output.text_offsets[-1:])
        choice["finish_reason"] = event.finish_reason
        if event.finish_reason is not None:
            choice["metrics"] = metrics_json(event.metrics)
        yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(list(outputs.values()), prompt_tokens)}


async def _after_roles(
    head: dict[str, Any], choices: list[Choice], chunks: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """A chat stream: first a chunk naming the role of each choice, as OpenAI's."""
    for choice in choices:
        delta = {"role": "assistant", "content": ""}
        first = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None}
        yield {**head, "choices": [first]}
    async for chunk in chunks:
        yield chunk


async def _collect(choices: list[Choice]) -> list[ChoiceOutput]:
    outputs = [ChoiceOutput(c.index) for c in choices]
    async for index, event in merged_events(choices):
        outputs[index].add(event)
    return outputs


async def _until_disconnected(request: Request, work: Callable[[], Awaitable[_T]]) -> _T:
    """`work()`'s result; cancelled (its requests aborted) if the client disconnects first."""
    results: list[_T] = []

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tasks.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            results.append(await work())
            tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) from None
    if not results:
        raise ClientDisconnectedError(request.url.path)
    return results[0]


def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: a `data: {json}` line per chunk, then `data: [DONE]`. An error after
    the stream began (the engine failed, a grammar violation) is sent as an `error` object."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, allow_nan=False)}\n\n"
        except MedhaError as exc:
            status, kind = _status_of(exc)
            body = {"error": {"message": str(exc), "type": kind, "param": None, "code": status}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _status_of(exc: MedhaError) -> tuple[int, str]:
    if isinstance(exc, ModelNotFoundError):
        return 404, "invalid_request_error"
    if isinstance(exc, InvalidRequestError):
        return 400, "invalid_request_error"
    if isinstance(exc, EngineClosedError | EngineFailedError):
        return 503, "server_error"
    return 500, "server_error"


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


async def _medha_error(_: Request, exc: MedhaError) -> JSONResponse:
    status, kind = _status_of(exc)
    return _error(status, str(exc), kind)


async def _disconnected(_: Request, exc: ClientDisconnectedError) -> Response:
    # Nobody reads this: nginx's 499 ("client closed request") for the access log.
    _log.info("client disconnected; its requests were aborted", path=str(exc))
    return Response(status_code=499)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a body of the wrong shape with 400, not FastAPI's 422.
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'] if part != 'body')}: {error['msg']}"
        for error in exc.errors()
    )
    return _error(400, problems or "invalid request body", "invalid_request_error")
