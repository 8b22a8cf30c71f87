"""Shared set-up of the server tests: OpenAI's client of an engine's app, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai

import medha
from medha.server import create_app
from tests.engine_support import engine_config

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


def openai_client(
    engine: medha.Engine, **app_options: Any
) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    """OpenAI's client of `engine`'s app (create_app's `app_options`), and the HTTP client
    under it (no socket)."""
    transport = httpx2.ASGITransport(app=create_app(engine, **app_options))
    http = httpx2.AsyncClient(transport=transport, base_url="http://medha")
    client = openai.AsyncOpenAI(
        api_key="unused", base_url="http://medha/v1", http_client=http, max_retries=0
    )
    return client, http


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[tuple[medha.Engine, openai.AsyncOpenAI]]:
    async with medha.Engine(engine_config(**config)) as engine:
        client, http = openai_client(engine)
        async with http:
            yield engine, client
