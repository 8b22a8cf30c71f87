"""CORS (`medha serve --allowed-origins`): web pages from the allowed origins may call the API
from a browser, streams included; others, and every origin by default, are not told they may."""

from __future__ import annotations

import argparse

import pytest

import medha
from medha.commands.serve import origin_list
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
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
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


def test_allowed_origins_are_a_json_list_as_vllm_takes_them() -> None:
    assert origin_list('["https://a.example", "*"]') == ["https://a.example", "*"]
    for bad in ("https://a.example", '{"a": 1}', "[1]"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a JSON list of origins"):
            origin_list(bad)
