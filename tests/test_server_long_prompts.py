"""The server tokenizes a long prompt (a chat's rendered template, a completion's text) on a
worker thread: other streams go on meanwhile, and the response is what an inline one is."""

from __future__ import annotations

from typing import Any

import pytest

import medha
from tests.engine_support import MODEL, HeldEncode, idle, long_from
from tests.server_support import MESSAGES, PROMPT, serving

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
    """`call()`'s response, tokenized while another stream goes on."""
    response: list[Any] = []

    async def send() -> None:
        response.append(await call())

    await held.run_while_others_stream(engine, send)
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
    # The same counts (the second time, the prompt's whole blocks are in the prefix cache).
    assert off_loop.usage.model_dump(exclude={"prompt_tokens_details"}) == inline.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
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
