"""`medha serve MODEL`: an OpenAI-compatible HTTP server (medha.server) over one Engine."""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medha.commands.arg_types import positive_float, positive_int
from medha.commands.user_errors import UsageError

if TYPE_CHECKING:
    from medha.config import EngineConfig

PARSER_NAMES = ("hermes", "llama3_json")
"""medha.server.tool_parsers.PARSERS' names (not imported: the server's modules load late)."""
REASONING_PARSER_NAMES = ("deepseek_r1", "qwen3")
"""medha.server.reasoning.REASONING_PARSERS' names."""
GRACE_S = 5.0
"""How long open responses get to end after Ctrl-C (--timeout-graceful-shutdown)."""
_CUT_MARGIN_S = 1.0
"""How long before uvicorn's cut the engine stops: time for the responses to finish sending."""
API_KEY_VARIABLE = "MEDHA_API_KEY"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (a preset name, an HF checkpoint folder or a .gguf file) at "
        "http://HOST:PORT/v1 (completions, chat completions, responses, models), with /tokenize, "
        "/detokenize, /health, /version, /stats and /metrics. "
        "Needs the serve extra: pip install 'medha[serve]' -c constraints.txt.",
    )
    p.add_argument("model", help="smollm2-135m, tiny-random, an HF folder or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local)")
    p.add_argument("--port", type=port_number, default=8000, help="(default: 8000; 0: any free)")
    p.add_argument(
        "--timeout-graceful-shutdown",
        type=positive_float,
        default=GRACE_S,
        metavar="SECONDS",
        help="uvicorn's graceful shutdown after Ctrl-C: open responses get 1 s less (half, if "
        f"shorter) to end; then they end with an error (default: {GRACE_S:g})",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: MODEL)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"clients must send it (Authorization: Bearer KEY); default: ${API_KEY_VARIABLE}",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a JSON file of EngineConfig fields (docs/engine.md); the options here override it",
    )
    p.add_argument("--policy", default=None, help="lars (default), fcfs, fcfs-chunked, edf, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default 1)")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument(
        "--generation-config",
        default=None,
        help="sampling defaults for the fields a request leaves out, as vLLM's option: 'auto' "
        "(default: the model's generation_config.json), 'vllm' (none), or a folder holding one",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(PARSER_NAMES),
        help='reads the tool calls of chat requests with tool_choice "auto" (vLLM\'s names); '
        'a named function or "required" needs none',
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM's command lines: --tool-call-parser alone enables it",
    )
    p.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (the tokenizer's configuration and chat template), as "
        "vLLM's option does",
    )
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="accepted for vLLM's command lines: medha always sends usage's "
        "prompt_tokens_details (its cached tokens), as OpenAI does",
    )
    p.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprobs name tokens 'token_id:ID' instead of by their text (a request's "
        "return_tokens_as_token_ids overrides it), as vLLM's option does",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSER_NAMES,
        help="puts a chat's thinking (<think>...</think>) in message.reasoning, apart from its "
        "answer (vLLM's names)",
    )
    p.add_argument(
        "--allowed-origins",
        type=origin_list,
        default=[],
        help="web pages from these origins may call the API from a browser (CORS), a JSON list "
        "as vLLM takes it: '[\"https://app.example.com\"]', or '[\"*\"]' for any; default none",
    )
    p.set_defaults(func=run)


def origin_list(text: str) -> list[str]:
    """`--allowed-origins`: a JSON list of strings, as vLLM's."""
    try:
        origins = json.loads(text)
    except json.JSONDecodeError:
        origins = None
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise argparse.ArgumentTypeError(f"not a JSON list of origins: {text!r}")
    return origins


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {text!r}")
    return port


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  # medha.server's, checked here for a clear message
        import uvicorn
    except ImportError as exc:
        raise UsageError(
            "medha serve needs FastAPI and uvicorn: pip install 'medha[serve]' -c constraints.txt"
        ) from exc
    import anyio

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise UsageError("--enable-auto-tool-choice needs --tool-call-parser")
    config = engine_config(args)
    anyio.run(_serve, config, args, uvicorn)
    return 0


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of `--config` (if given) with the command line's options over it."""
    from medha.config import EngineConfig

    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            fields = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read the config {args.config}: {exc}") from exc
        if not isinstance(fields, dict):
            raise UsageError(f"{args.config} must hold a JSON object of EngineConfig fields")
    fields["model"] = args.model
    options = {
        "policy": args.policy,
        "dtype": args.dtype,
        "device": args.device,
        "kv_cache_gib": args.kv_cache_gib,
        "max_model_len": args.max_model_len,
        "generation_config": args.generation_config,
    }
    fields.update({name: value for name, value in options.items() if value is not None})
    return EngineConfig(**fields)


async def _serve(config: EngineConfig, args: argparse.Namespace, uvicorn: Any) -> None:
    # Bound before the engine starts: a port in use is found in a moment, not after loading.
    listening = listening_sockets(args.host, args.port)
    try:
        await _serve_on(listening, config, args, uvicorn)
    finally:
        for sock in listening:
            sock.close()


async def _serve_on(
    listening: list[socket.socket],
    config: EngineConfig,
    args: argparse.Namespace,
    uvicorn: Any,
) -> None:
    import anyio

    from medha.engine import Engine
    from medha.server import create_app

    async with Engine(config, model_name=args.served_model_name) as engine:
        try:
            app = create_app(
                engine,
                args.served_model_name,
                api_key=args.api_key,
                tool_call_parser=args.tool_call_parser,
                enable_tokenizer_info=args.enable_tokenizer_info_endpoint,
                return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                reasoning_parser=args.reasoning_parser,
                allowed_origins=args.allowed_origins,
            )
        except ValueError as exc:  # a parser this model's tokenizer defeats
            raise UsageError(str(exc)) from exc
        freeze_startup_heap()
        # On Ctrl-C, open streams get `grace` seconds to end; then they end with an error.
        grace = args.timeout_graceful_shutdown
        settings = uvicorn.Config(
            app, host=args.host, port=args.port, timeout_graceful_shutdown=grace
        )
        server = uvicorn.Server(settings)

        async def serve() -> None:
            await server.serve(sockets=listening)
            tasks.cancel_scope.cancel()  # the watch below too

        async def end_streams_before_the_cut() -> None:
            # uvicorn cancels the responses still running `grace` after Ctrl-C: a stream
            # just stops (and the log gets a CancelledError per response). Stopping the
            # engine first ends each with an error event and [DONE], a whole response with
            # a 503, which the server then finishes sending.
            while not server.should_exit:
                await anyio.sleep(0.1)
            await anyio.sleep(grace - min(_CUT_MARGIN_S, grace / 2))
            await engine.stop()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            tasks.start_soon(end_streams_before_the_cut)
            while not (server.started or server.should_exit):
                await anyio.sleep(0.05)
            if server.started:
                host = f"[{args.host}]" if ":" in args.host else args.host  # IPv6
                port = listening[0].getsockname()[1]  # the one the system chose for --port 0
                print(
                    f"medha: serving {args.model} at http://{host}:{port}/v1 "
                    f"(policy {config.policy}, {engine.max_model_len}-token context)",
                    file=sys.stderr,
                    flush=True,
                )


def freeze_startup_heap() -> None:
    """Leave what start-up made (torch's, transformers' and the model's objects: ~370K for
    SmolLM2) out of the garbage collector's full passes, as vLLM and SGLang do. Each pass
    walked them all, on the event loop: ~250 ms every so often under load, a pause in every
    stream. This process is the server's own; an embedding application decides for its own
    (`gc.freeze()` after `Engine.start()`)."""
    gc.collect()
    gc.freeze()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound here, one per address `host` resolves to (as asyncio's
    create_server binds them: "" is every interface, IPv4 and IPv6), all on one port. A port
    in use or a host that is not this machine's is the user's to fix (one line, exit 2),
    where uvicorn would exit from inside the server's task with a traceback."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 off): as asyncio, skip it
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # or binding :: would take 0.0.0.0's port too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # --port 0: the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if not sockets:
        raise UsageError(f"cannot listen on {host}:{port}: no address this machine can use")
    return sockets
