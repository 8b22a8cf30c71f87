"""vLLM's chat `echo`: the content starts with the last message's when that is the
assistant's (a prefilled answer the model goes on with), whole and streamed alike."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine_support import MODEL
from tests.server_support import MESSAGES, serving

pytestmark = pytest.mark.anyio

PREFILLED = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _streamed(client: Any, **body: Any) -> dict[int, str]:
    contents: dict[int, str] = {}
    async for chunk in await client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
    return contents


async def test_echo_starts_the_content_with_the_prefilled_answer() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": PREFILLED, "max_tokens": 6}
    body.update(temperature=0.0, n=2)
    go_on = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    async with serving() as (_, client):
        plain = await client.chat.completions.create(**body, extra_body=go_on)
        echoed = await client.chat.completions.create(**body, extra_body={**go_on, "echo": True})
        streamed = await _streamed(client, **body, extra_body={**go_on, "echo": True})
        parts = [
            *MESSAGES,
            {"role": "assistant", "content": [{"type": "text", "text": "The answer"}] * 2},
        ]
        joined = await client.chat.completions.create(
            **{**body, "messages": parts}, extra_body={**go_on, "echo": True}
        )
        # The last message is the user's: nothing to echo.
        asked = {**body, "messages": MESSAGES}
        unechoed = await client.chat.completions.create(
            **asked, extra_body={"echo": True, "ignore_eos": True}
        )
        unprefixed = await client.chat.completions.create(**asked, extra_body={"ignore_eos": True})
    for plain_choice, choice in zip(plain.choices, echoed.choices, strict=True):
        assert choice.message.content == "The answer is" + (plain_choice.message.content or "")
    assert streamed == {c.index: c.message.content for c in echoed.choices}
    assert (joined.choices[0].message.content or "").startswith("The answer\nThe answer")
    assert [c.message.content for c in unechoed.choices] == [
        c.message.content for c in unprefixed.choices
    ]
    assert echoed.usage is not None and plain.usage is not None
    # The echo is not generated: the same counts (the prompt was cached the second time).
    counts = ("prompt_tokens", "completion_tokens")
    assert [getattr(echoed.usage, c) for c in counts] == [getattr(plain.usage, c) for c in counts]
