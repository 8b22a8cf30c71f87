"""CORS (`medha serve --allowed-origins`): web pages from the allowed origins may call the API
from a browser, streams included; others, and every origin by default, are not told they may."""

from __future__ import annotations

import argparse

import httpx2
import pytest

import medha
from medha.commands.serve import origin_list
from medha.server import create_app
from tests.engine_support import MODEL, engine_config
from tests.server_support import openai_client

pytestmark = pytest.mark.anyio

APP = "https://app.example.com"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_allowed_origin_may_call_the_api_from_a_browser() -> None:
    # A chunk is sent only for an event that says something, and a token may spell no text yet
    # (a byte of a character): greedy from this prompt, the tiny model says " r" three times.
    body = {
        "model": MODEL,
        "prompt": "abc",
        "max_tokens": 3,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    async with medha.Engine(engine_config()) as engine:
        _, http = openai_client(engine, allowed_origins=[APP])
        _, closed = openai_client(engine)  # the default: no origin
        async with http, closed:
            allowed = await http.options("/v1/completions", headers={"Origin": APP, **PREFLIGHT})
            other = await http.options(
                "/v1/completions", headers={"Origin": "https://evil.example", **PREFLIGHT}
            )
            streamed = await http.post("/v1/completions", json=body, headers={"Origin": APP})
            default = await closed.options("/v1/completions", headers={"Origin": APP, **PREFLIGHT})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert streamed.headers["access-control-allow-origin"] == APP
    assert streamed.text.rstrip().endswith("data: [DONE]") and streamed.text.count("data:") > 2
    assert "access-control-allow-origin" not in default.headers


async def test_a_preflight_needs_no_api_key_and_a_call_still_does() -> None:
    async with medha.Engine(engine_config()) as engine:
        _, http = openai_client(engine, allowed_origins=[APP], api_key="secret")
        async with http:
            preflight = await http.options("/v1/models", headers={"Origin": APP, **PREFLIGHT})
            refused = await http.get("/v1/models", headers={"Origin": APP})
    # A browser sends no Authorization header with a preflight.
    assert preflight.status_code == 200
    assert refused.status_code == 401  # and the browser may read why
    assert refused.headers["access-control-allow-origin"] == APP


async def test_an_unexpected_error_still_tells_the_browser_it_may_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with medha.Engine(engine_config()) as engine:
        app = create_app(engine, allowed_origins=[APP])
        with pytest.raises(TypeError, match="a list of origins, not one string"):
            create_app(engine, allowed_origins=APP)

        def broken() -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(engine, "stats", broken)
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
            failed = await http.get("/stats", headers={"Origin": APP})
    assert failed.status_code == 500 and failed.json()["error"]["message"]
    assert failed.headers["access-control-allow-origin"] == APP


def test_allowed_origins_are_a_json_list_as_vllm_takes_them() -> None:
    assert origin_list('["https://a.example", "*"]') == ["https://a.example", "*"]
    for bad in ("https://a.example", '{"a": 1}', "[1]"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a JSON list of origins"):
            origin_list(bad)
