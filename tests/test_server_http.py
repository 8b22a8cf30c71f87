"""medha's OpenAI-compatible API over a real socket (uvicorn): tokens stream as they are made; a
client that disconnects, streaming or not, aborts its request and frees its KV blocks; and
`medha serve` serves a model until interrupted."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx2
import openai
import pytest
import uvicorn
from starlette.requests import ClientDisconnect

import medha
from medha.server import create_app
from tests.docs_support import run_documented_example
from tests.engine_support import MODEL, cost_profile_path, engine_config, free_port

pytestmark = pytest.mark.anyio

LONG = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 3000, "temperature": 0.0}
LONG["ignore_eos"] = True


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def http_server() -> AsyncIterator[tuple[medha.Engine, httpx2.AsyncClient]]:
    async with medha.Engine(engine_config()) as engine:
        port = free_port()
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error")
        server = uvicorn.Server(config)
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            with anyio.fail_after(10):
                while not server.started:
                    await anyio.sleep(0.02)
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                yield engine, client
            server.should_exit = True


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off: an abort must not wait for it to close a stream."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _aborted_and_freed(engine: medha.Engine, aborted: int) -> None:
    with anyio.fail_after(2):
        while (stats := engine.stats()).running or stats.waiting:
            await anyio.sleep(0.01)
    assert stats.aborted == aborted and stats.finished == 0
    assert stats.free_blocks == stats.total_blocks


@pytest.mark.usefixtures("no_gc")
async def test_a_client_leaving_a_stream_aborts_its_request() -> None:
    async with http_server() as (engine, client):
        async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            chunks = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[len("data: ") :]))
                if len(chunks) == 3:
                    break  # the tokens came one by one, long before the 3000th
            assert engine.stats().running == 1
        await _aborted_and_freed(engine, aborted=1)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 3


@pytest.mark.usefixtures("no_gc")
async def test_a_client_giving_up_on_a_completion_aborts_it() -> None:
    async with http_server() as (engine, client):
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("/v1/chat/completions", json=_as_chat(LONG), timeout=0.5)
        await _aborted_and_freed(engine, aborted=1)
        # Its choices all go: n = 3.
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("/v1/completions", json={**LONG, "n": 3}, timeout=0.5)
        await _aborted_and_freed(engine, aborted=4)


def _as_chat(body: dict[str, object]) -> dict[str, object]:
    chat = {key: value for key, value in body.items() if key != "prompt"}
    return {**chat, "messages": [{"role": "user", "content": body["prompt"]}]}


@contextmanager
def _medha_serve(
    tmp_path: Path, *options: str
) -> Iterator[tuple[int, list[str], subprocess.Popen[str]]]:
    """`medha serve` of the test model in a process of its own: its port, its stderr's lines
    so far and the process; on leaving, interrupted (Ctrl-C) and waited for."""
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"cost_profile": str(cost_profile_path()), "num_blocks": 256}))
    # Port 0: the system picks a free one, and the banner says which.
    command = [sys.executable, "-m", "medha.cli", "serve", MODEL, "--port", "0"]
    command += ["--config", str(config), "--served-model-name", "tiny", "--policy", "fcfs"]
    server = subprocess.Popen(
        [*command, *options],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True)
    reader.start()
    banner = re.compile(rf"medha: serving {MODEL} at http://127\.0\.0\.1:(\d+)/v1 \(policy fcfs")
    try:
        deadline = time.monotonic() + 120
        while not (found := [m for line in list(lines) if (m := banner.search(line))]):
            assert server.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        port = int(found[0].group(1))
        assert port != 0
        yield port, lines, server
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        reader.join(timeout=10)
    assert server.returncode in (0, 130), "".join(lines)


@pytest.mark.slow
def test_medha_serve_serves_a_model_until_interrupted(tmp_path: Path) -> None:
    with _medha_serve(tmp_path) as (port, _, _):
        assert httpx2.get(f"http://127.0.0.1:{port}/health").status_code == 200
        with openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1") as client:
            done = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
                extra_body={"ignore_eos": True},
            )
            assert done.choices[0].message.content and done.model == "tiny"
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=MODEL, prompt="hi")
        # The metrics are labelled with the served name.
        metrics = httpx2.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'medha:generation_tokens_total{model_name="tiny"} 5.0' in metrics


@pytest.mark.slow
def test_ctrl_c_ends_an_open_stream_with_an_error_before_the_cut(tmp_path: Path) -> None:
    """The engine stops before uvicorn's graceful shutdown ends: the stream gets an error
    event and [DONE] (uvicorn's cut had stopped it mid-way, with a CancelledError traceback
    in the log)."""
    body = {**LONG, "model": "tiny", "stream": True, "ignore_eos": True}
    with _medha_serve(tmp_path, "--timeout-graceful-shutdown", "2") as (port, lines, server):
        received: list[str] = []
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx2.stream("POST", url, json=body, timeout=60) as response:
            stream = (line for line in response.iter_lines() if line)
            received.append(next(stream))
            server.send_signal(signal.SIGINT)
            received.extend(stream)
    assert received[-1] == "data: [DONE]"
    error = json.loads(received[-2].removeprefix("data: "))["error"]
    assert "closed" in error["message"] and error["code"] == 503
    assert 1 < len(received) < 3000
    assert not [line for line in lines if "Exception in ASGI application" in line]


def test_the_docs_example_serves_an_engine_inside_the_callers_loop() -> None:
    printed, expected = run_documented_example(Path(__file__).parent.parent / "docs" / "server.md")
    assert printed == expected


@pytest.mark.usefixtures("no_gc")
async def test_a_stream_cut_inside_send_aborts_its_requests_at_once() -> None:
    # An ASGI server of spec 2.4 tells a gone client by raising OSError from `send`, where
    # Starlette leaves the response's body suspended: the body must still be closed (and its
    # requests aborted) before the response returns, not when the garbage collector runs.
    body = json.dumps({**LONG, "stream": True, "n": 2}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"medha")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if len(sent) == 4:  # the headers, then three chunks
            raise OSError("the client went away")

    async with medha.Engine(engine_config()) as engine:
        with pytest.raises(ClientDisconnect) as cut:
            await create_app(engine)(scope, receive, send)
        # While the error lives (a server logging it, an error tracker holding it), its
        # traceback's frames hold the response and its body.
        await _aborted_and_freed(engine, aborted=2)
        assert cut.value.__traceback__ is not None
