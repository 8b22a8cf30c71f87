"""An OpenAI-compatible HTTP API over a running Engine (FastAPI).

    async with medha.Engine(config) as engine:
        app = create_app(engine)          # mount it in a service, or: medha serve MODEL

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`stream: true`; chat with OpenAI's tools, medha.server.tool_protocol), POST /tokenize and
/detokenize (vLLM's; GET /tokenizer_info too, when enabled), GET /v1/models, /health (and
/ping), /version, /stats and /metrics (the engine's Prometheus metrics, medha.engine_metrics).
The app does not own the engine: whoever started it stops it, after the server. A client that
disconnects aborts its requests, streamed or not, and frees their KV cache. Errors have OpenAI's
shape ({"error": {"message", "type", "param", "code"}}): a request medha refuses
(medha.errors.InvalidRequestError, or a body of the wrong shape) is a 400 before anything is
queued.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

import medha
from medha.engine import Engine
from medha.engine_metrics import CONTENT_TYPE
from medha.errors import (
    InvalidRequestError,
    MedhaError,
    PromptTooLongError,
    RequestTooLargeError,
)
from medha.log import get_logger
from medha.sampling import SamplingParams
from medha.server.choices import start_choices
from medha.server.echo import EchoedPrompt, echoed_prompt
from medha.server.middleware import ApiKeyGuard, UnexpectedErrors
from medha.server.openai_responses import ResponsesRequest
from medha.server.prompts import chat_prompt, completion_prompt_ids, off_loop_if_long
from medha.server.protocol import ChatCompletionRequest, CompletionRequest
from medha.server.reasoning import Reasoning, ReasoningParser, chat_reasoning
from medha.server.reasoning import reasoning_parser as find_reasoning_parser
from medha.server.responses import Renderer, TokenStrings, usage
from medha.server.responses_reply import responses_reply
from medha.server.responses_truncation import fewest_dropped, turn_starts, without_turns
from medha.server.streaming import (
    ClientDisconnectedError,
    ModelNotFoundError,
    Started,
    chunks,
    collect,
    error_body,
    event_stream,
    status_of,
    until_disconnected,
)
from medha.server.tokenize import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    tokenize,
    tokenizer_info,
)
from medha.server.tool_calls import ToolCalling
from medha.server.tool_parsers import ToolCallParser
from medha.server.tool_parsers import tool_call_parser as parser_for

_log = get_logger(__name__)

_Body = CompletionRequest | ChatCompletionRequest | TokenizeRequest | DetokenizeRequest


def create_app(
    engine: Engine,
    served_model_name: str | None = None,
    *,
    api_key: str | None = None,
    tool_call_parser: str | ToolCallParser | None = None,
    enable_tokenizer_info: bool = False,
    return_tokens_as_token_ids: bool = False,
    reasoning_parser: str | ReasoningParser | None = None,
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The API of `engine` (started, on this event loop), serving it as `served_model_name`
    (default: EngineConfig.model). With `api_key`, every /v1 request must bring it
    (`Authorization: Bearer KEY`, what OpenAI's clients send), and so must /tokenize and
    /detokenize; /health, /ping, /version, /stats and /metrics (there unless
    EngineConfig.enable_metrics is off) stay open. `tool_call_parser` reads the calls of chat
    requests with `tool_choice: "auto"`: a name (`hermes`, `llama3_json`:
    medha.server.tool_parsers; ValueError for one that cannot read this model's output) or a
    ToolCallParser of your own.
    `enable_tokenizer_info` adds vLLM's GET /tokenizer_info (the tokenizer's configuration and
    chat template, for clients that tokenize as the server does), behind the key as /tokenize
    is; off by default, as in vLLM, since it shows the chat template.
    `return_tokens_as_token_ids`: logprobs name tokens `token_id:ID`, not by their text, unless
    a request says otherwise (its own `return_tokens_as_token_ids`), as vLLM's option.
    `reasoning_parser` (`deepseek_r1`, `qwen3`: medha.server.reasoning) puts a chat's thinking
    in `message.reasoning`, apart from its answer (ValueError for a name medha lacks, or tags
    this model's tokenizer drops as special tokens). `allowed_origins` lets web pages from those
    origins (`https://app.example.com`, or `*` for any) call the API from a browser (CORS), as
    vLLM's `--allowed-origins`; none by default (vLLM allows any)."""
    parser = tool_call_parser
    if isinstance(parser, str):
        parser = parser_for(parser, engine.tokenizer)
    api = _Api(
        engine,
        served_model_name or engine.config.model,
        parser,
        return_tokens_as_token_ids,
        None
        if reasoning_parser is None
        else find_reasoning_parser(reasoning_parser, engine.tokenizer),
    )
    app = FastAPI(title="medha", summary="OpenAI-compatible API of a medha Engine")
    if allowed_origins:
        _allow_origins(app, allowed_origins)
    app.add_exception_handler(MedhaError, _error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnectedError, _disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(UnexpectedErrors)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/ping", api.health, methods=["GET", "POST"])  # SageMaker's, as vLLM's
    app.add_api_route("/version", api.version, methods=["GET"])
    app.add_api_route("/stats", api.stats, methods=["GET"])
    if engine.metrics is not None:  # else a 404, as for any path the app lacks
        app.add_api_route("/metrics", api.metrics, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    if enable_tokenizer_info:
        app.add_api_route("/tokenizer_info", api.tokenizer_info, methods=["GET"])
    posts = [
        ("/v1/completions", api.completions),
        ("/v1/chat/completions", api.chat_completions),
        ("/v1/responses", api.responses),
        ("/tokenize", api.tokenize),
        ("/detokenize", api.detokenize),
    ]
    for path, endpoint in posts:
        app.add_api_route(
            path,
            endpoint,  # type: ignore[arg-type]  # mypy joins the methods' types to "function"
            methods=["POST"],
            response_model=None,
        )
    if api_key is not None:  # added last: outside the error layer, before any body is read
        guarded = ["/v1/models", "/tokenizer_info", *(path for path, _ in posts)]
        app.add_middleware(ApiKeyGuard, key=api_key, paths=guarded)
    return app


@dataclass(frozen=True)
class _ChatRequest:
    params: SamplingParams
    prompt_ids: list[int]
    tools: ToolCalling | None
    reasoning: Reasoning | None


class _Api:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        parser: ToolCallParser | None,
        tokens_as_ids: bool,
        reasoning_parser: ReasoningParser | None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tool_call_parser = parser
        self.created = int(time.time())
        self.strings = TokenStrings(engine.tokenizer)
        self.tokens_as_ids = tokens_as_ids
        """The default of requests' `return_tokens_as_token_ids`."""
        self.reasoning_parser = reasoning_parser

    async def health(self) -> JSONResponse:
        try:
            self.engine.stats()
        except MedhaError as exc:
            return await _error(None, exc)
        return JSONResponse({"status": "ok"})

    async def version(self) -> dict[str, str]:
        return {"version": medha.__version__}

    async def stats(self) -> dict[str, Any]:
        return asdict(self.engine.stats())

    async def metrics(self) -> Response:
        assert self.engine.metrics is not None, "the route is there only with metrics"
        return Response(self.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created}
        card.update(owned_by="medha", max_model_len=self.engine.max_model_len)
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(body, request)
        body.check_supported()
        prompts = body.prompts()
        body.check_choices(len(prompts))
        prompt_only = bool(body.echo) and body.max_tokens == 0  # score the prompt, no more
        params = body.sampling_params(
            1 if prompt_only else body.max_tokens,
            body.logprobs,
            body.engine_prompt_logprobs(),
            defaults=self.engine.sampling_defaults,
        )
        prompt_ids = await completion_prompt_ids(
            self.engine, prompts, params, body.add_special_tokens
        )
        echoes = None
        if body.echo:
            tokenizer, special = self.engine.tokenizer, body.add_special_tokens
            echoes = [
                await off_loop_if_long(
                    prompt, echoed_prompt, tokenizer, prompt, ids, special, prompt_only
                )
                for prompt, ids in zip(prompts, prompt_ids, strict=True)
            ]
        started = await self._start(
            request, body, params, prompt_ids, chat=False, echoes=echoes, prompt_only=prompt_only
        )
        return await self._respond(request, body, started)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._respond(request, body, await self._start_chat(body, request))

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API, as the chat request it means (medha.server.openai_responses)."""
        if body.truncation == "auto" and not isinstance(body.input, str):
            chat_body, chat = await self._fitting_chat(body, request)
        else:
            chat_body = _chat_request_of(body)
            chat = await self._chat(chat_body, request)
        started = await self._start_chat(chat_body, request, chat)
        return await responses_reply(request, body, started, self.model_name, self.engine)

    async def _fitting_chat(
        self, body: ResponsesRequest, request: Request
    ) -> tuple[ChatCompletionRequest, _ChatRequest]:
        """The chat of a Responses request with `truncation: "auto"`: its input without the
        fewest oldest turns that leave it room in the context (responses_truncation)."""
        assert not isinstance(body.input, str)
        items = body.input
        starts = turn_starts(items)
        tried: dict[int, tuple[ChatCompletionRequest, _ChatRequest]] = {}

        async def fits(dropped: int) -> bool:
            kept = without_turns(items, starts, dropped)
            chat_body = _chat_request_of(body.model_copy(update={"input": kept}))
            # Checked (its model, its ignored fields logged) on the first try only.
            chat = await self._chat(chat_body, request, checked=bool(tried))
            tried[dropped] = chat_body, chat
            try:
                self.engine.output_limit(len(chat.prompt_ids), chat.params)
            except (PromptTooLongError, RequestTooLargeError):
                return False
            return True

        dropped = await fewest_dropped(len(starts), fits)
        if dropped:
            _log.info("responses input truncated", turns=len(starts), dropped_turns=dropped)
        return tried[dropped]

    async def _start_chat(
        self, body: ChatCompletionRequest, request: Request, chat: _ChatRequest | None = None
    ) -> Started:
        """A chat request's choices started (`chat`: its prompt and parameters, when made)."""
        if chat is None:
            chat = await self._chat(body, request)
        prompt_ids = [chat.prompt_ids]
        return await self._start(
            request,
            body,
            chat.params,
            prompt_ids,
            chat=True,
            tools=chat.tools,
            reasoning=chat.reasoning,
        )

    async def _chat(
        self, body: ChatCompletionRequest, request: Request, checked: bool = False
    ) -> _ChatRequest:
        """A chat request checked (unless `checked` already), its sampling params and its
        prompt."""
        if not checked:
            self._check(body, request)
        body.check_supported()
        body.check_choices(1)
        tools = body.tool_calling(self.tool_call_parser)
        schema = None if tools is None else tools.schema
        params = body.sampling_params(
            body.output_limit(),
            body.logprob_count(),
            body.prompt_logprobs,
            schema,
            self.engine.sampling_defaults,
        )
        tokenizer = self.engine.tokenizer
        if not tokenizer.has_chat_template:
            raise InvalidRequestError(f"the model `{self.model_name}` has no chat template")
        text, prompt_ids = await chat_prompt(self.engine, body, params)
        reasoning = None
        if self.reasoning_parser is not None:
            continued = body.final_assistant_text() if body.continues_final_message() else None
            params, reasoning = chat_reasoning(
                self.reasoning_parser,
                tokenizer,
                (text, prompt_ids),
                params,
                body.include_reasoning,
                continued,
            )
        return _ChatRequest(params, prompt_ids, tools, reasoning)

    async def _respond(
        self, request: Request, body: CompletionRequest | ChatCompletionRequest, started: Started
    ) -> Response:
        """A completion or chat request's response, whole or (`stream`) as its chunks."""
        head = started.head
        if body.stream:
            if head["object"] == "chat.completion":
                head["object"] = "chat.completion.chunk"
            per_chunk = body.wants_usage_per_chunk
            stream = chunks(
                head,
                started.choices,
                started.render,
                body.wants_usage,
                started.prompt_tokens,
                per_chunk,
            )
            return event_stream(stream)
        outputs = await until_disconnected(
            request, lambda: collect(started.choices, started.render)
        )
        rendered = [
            started.render.whole(o, c.prompt_ids)
            for o, c in zip(outputs, started.choices, strict=True)
        ]
        response = {**head, "choices": rendered, "usage": usage(outputs, started.prompt_tokens)}
        if head["object"] == "chat.completion":
            # vLLM's place: once, beside the choices, which share the one prompt.
            rows = [choice.pop("prompt_logprobs") for choice in rendered]
            response["prompt_logprobs"] = rows[0]
        return JSONResponse(response)

    async def _start(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        params: SamplingParams,
        prompt_ids: list[list[int]],
        chat: bool,
        tools: ToolCalling | None = None,
        echoes: list[EchoedPrompt] | None = None,
        prompt_only: bool = False,
        reasoning: Reasoning | None = None,
    ) -> Started:
        """A request's choices started in the engine, and how their output is written."""
        # A client's X-Request-Id names the response; engine ids get a unique part as well, so
        # that gateways reusing one trace id for several calls are not refused.
        given = request.headers.get("x-request-id")
        response_id = given or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        engine_ids = f"{given}-{uuid.uuid4().hex[:8]}" if given else response_id
        choices = await start_choices(
            self.engine,
            prompt_ids,
            params,
            body.n,
            body.deadline,
            engine_ids,
            echoes,
            prompt_only,
            cache_salt=body.cache_salt,
        )
        render = Renderer(
            chat,
            self.strings,
            params.logprobs is not None,
            tools,
            top_logprobs=params.logprobs or 0,
            prompt_logprobs=body.prompt_logprobs,
            tokens_as_ids=(
                self.tokens_as_ids
                if body.return_tokens_as_token_ids is None
                else body.return_tokens_as_token_ids
            ),
            reasoning=reasoning,
            chat_echo=body.echoed() if isinstance(body, ChatCompletionRequest) else "",
        )
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": response_id, "object": kind, "created": int(time.time())}
        head["model"] = self.model_name
        return Started(choices, render, head, [len(ids) for ids in prompt_ids])

    async def tokenizer_info(self) -> dict[str, Any]:
        return tokenizer_info(self.engine)

    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response:
        self._check(body, request)
        return await tokenize(self.engine, body)

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        self._check(body, request)
        return await detokenize(self.engine, body)

    def _check(self, body: _Body, request: Request) -> None:
        if body.model and body.model != self.model_name:  # none or "": the served one (vLLM)
            raise ModelNotFoundError(f"The model `{body.model}` does not exist.")
        ignored = body.ignored_fields()
        if ignored:
            _log.info("request fields ignored", path=request.url.path, fields=ignored)


def _chat_request_of(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completions request a Responses request means."""
    try:
        return ChatCompletionRequest.model_validate(body.chat_body())
    except ValidationError as exc:  # in the chat request it became: say which field
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"{where}: {first['msg']}") from exc


def _allow_origins(app: FastAPI, origins: Sequence[str]) -> None:
    """CORS for `origins`, around everything else, the API key's 401 and Starlette's own
    last-resort 500 included: an answer without the headers a browser shows as a network
    error instead. CORSMiddleware is pure ASGI: it leaves streamed responses' sends where
    they are."""
    if isinstance(origins, str):
        raise TypeError(f"allowed_origins is a list of origins, not one string: [{origins!r}]")
    build = app.build_middleware_stack

    def outermost() -> ASGIApp:
        return CORSMiddleware(
            build(), allow_origins=list(origins), allow_methods=["*"], allow_headers=["*"]
        )

    app.build_middleware_stack = outermost  # type: ignore[method-assign]  # Starlette's hook


async def _error(_: Request | None, exc: MedhaError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=status_of(exc)[0])


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own (no such route, wrong method, a body that is not JSON), in OpenAI's shape.
    error = {"message": str(exc.detail), "type": "invalid_request_error", "param": None}
    return JSONResponse({"error": {**error, "code": exc.status_code}}, status_code=exc.status_code)


async def _disconnected(_: Request, exc: ClientDisconnectedError) -> Response:
    # Nobody reads this: nginx's 499 ("client closed request") for the access log.
    _log.info("client disconnected; its requests were aborted", path=str(exc))
    return Response(status_code=499)


def _problem(error: Any) -> str:
    """One validation error, as "field.path: what is wrong" ("body: ..." for the whole body:
    not JSON, or not an object)."""
    if error.get("type") == "json_invalid":  # its loc is the body and a character offset
        reason = error.get("ctx", {}).get("error", "")
        return f"body: not valid JSON ({reason} at character {error['loc'][-1]})"
    where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
    return f"{where}: {error['msg']}"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a body of the wrong shape with 400, not FastAPI's 422.
    problems = "; ".join(_problem(error) for error in exc.errors())
    error = {"message": problems or "invalid request body", "type": "invalid_request_error"}
    return JSONResponse({"error": {**error, "param": None, "code": 400}}, status_code=400)
