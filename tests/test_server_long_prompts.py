"""The server tokenizes a long prompt (a chat's rendered template, a completion's text) on a
worker thread: other streams go on meanwhile, and the response is what an inline one is."""

from __future__ import annotations

import threading
from contextlib import aclosing
from typing import Any

import anyio
import pytest

import medha
from medha import SamplingParams
from tests.engine_support import MODEL, HeldEncode, long_from
from tests.server_support import MESSAGES, PROMPT, idle, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _chat(client: Any) -> Any:
    return await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.0, logprobs=True
    )


async def _completion(client: Any) -> Any:
    return await client.completions.create(
        model=MODEL, prompt=[PROMPT, "Another prompt"], max_tokens=6, temperature=0.0
    )


async def _while_another_streams(engine: medha.Engine, held: HeldEncode, call: Any) -> Any:
    """`call()`'s response, with its tokenizer held until a stream started before it has had 5
    more tokens (on the event loop, that could never happen)."""
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    response: list[Any] = []
    tokens_while_held = 0

    async def send() -> None:
        response.append(await call())

    async with (
        anyio.create_task_group() as group,
        aclosing(engine.stream("keep going", params)) as stream,
    ):
        async for _ in stream:
            if not held.entered.is_set():
                group.start_soon(send)
                await held.wait_entered()
                continue
            tokens_while_held += 1
            if tokens_while_held == 5:
                held.release.set()
                break
    assert tokens_while_held == 5 and not held.timed_out
    assert held.threads and threading.get_ident() not in held.threads
    return response[0]


@pytest.mark.parametrize("call", [_chat, _completion], ids=["chat", "completion"])
async def test_a_long_prompt_is_tokenized_off_the_loop_and_answered_as_inline(
    monkeypatch: pytest.MonkeyPatch, call: Any
) -> None:
    async with serving() as (engine, client):
        inline = await call(client)
        long_from(monkeypatch, 10)
        held = HeldEncode(engine, monkeypatch)
        off_loop = await _while_another_streams(engine, held, lambda: call(client))
        await idle(engine)
    assert off_loop.usage == inline.usage
    assert _outputs(off_loop) == _outputs(inline)
    # Batched with the other stream this time: the same logprobs, to float tolerance.
    assert _logprobs(off_loop) == pytest.approx(_logprobs(inline), abs=1e-4)
    assert _logprobs(inline) or call is _completion


def _outputs(response: Any) -> list[dict[str, Any]]:
    outputs = [c.model_dump(exclude={"metrics"}) for c in response.choices]
    for output in outputs:
        for row in (output["logprobs"] or {}).get("content", []):
            row.pop("logprob")
    return outputs


def _logprobs(response: Any) -> list[float]:
    rows = [c.logprobs.content for c in response.choices if c.logprobs is not None]
    return [row.logprob for content in rows for row in content]
