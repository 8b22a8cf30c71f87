"""`truncation: "auto"` on /v1/responses: a conversation too long for the context loses the
fewest oldest turns that make it fit (whole turns: a function call with its output), keeps what
comes before its first user message and its last turn, and answers as the chat of what is left
would; without it, or when the last turn alone is too long, the request is refused."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from medha.server.openai_responses import ResponsesRequest
from medha.server.responses_truncation import fewest_dropped, turn_starts, without_turns
from tests.engine_support import MODEL
from tests.server_support import serving

pytestmark = pytest.mark.anyio

CONTEXT = 256
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0.0, "max_output_tokens": 8}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _turn(index: int) -> list[dict[str, Any]]:
    """One turn of about 45 tokens: a question, a function call and its output, an answer."""
    call = f"call_{index}"
    return [
        {"role": "user", "content": f"Question {index}: what is the weather in city {index}?"},
        {"type": "function_call", "call_id": call, "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": call, "output": f"Sunny, {index} C"},
        {"role": "assistant", "content": f"It is sunny in city {index}, {index} degrees."},
    ]


def _conversation(turns: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "developer", "content": "Answer briefly."}]
    for index in range(turns):
        items += _turn(index)
    items.append({"role": "user", "content": "And tomorrow?"})
    return items


def test_turns_start_at_user_messages_and_go_whole() -> None:
    items = _conversation(3)
    starts = turn_starts(items)
    assert starts == [1, 5, 9, 13]
    kept = without_turns(items, starts, 2)
    assert kept == [items[0], *_turn(2), items[-1]]  # the preamble, then whole turns
    assert without_turns(items, starts, 0) is items


@pytest.mark.parametrize("turns", [1, 2, 5, 9])
async def test_the_fewest_turns_are_dropped_by_bisection(turns: int) -> None:
    for needed in range(turns):
        tried: list[int] = []

        async def fits(dropped: int, needed: int = needed, tried: list[int] = tried) -> bool:
            tried.append(dropped)
            return dropped >= needed

        assert await fewest_dropped(turns, fits) == needed
        assert tried[0] == 0 and len(tried) <= 2 + max(1, turns).bit_length()

    async def never(dropped: int) -> bool:
        return False

    assert await fewest_dropped(turns, never) == max(turns - 1, 0)


async def test_a_long_conversation_loses_its_oldest_turns_until_it_fits() -> None:
    items = _conversation(8)
    starts = turn_starts(items)
    async with serving(max_model_len=CONTEXT) as (_, client):
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.responses.create(**GREEDY, input=items)  # type: ignore[arg-type]
        done = await client.responses.create(
            **GREEDY,
            input=items,  # type: ignore[arg-type]
            instructions="Be kind.",
            truncation="auto",
        )
        streamed = [
            event
            async for event in await client.responses.create(
                **GREEDY,
                input=items,  # type: ignore[arg-type]
                instructions="Be kind.",
                truncation="auto",
                stream=True,
            )
        ]
        # What is left is the chat of the conversation without its first `dropped` turns; one
        # turn fewer dropped would not fit.
        chats = {}
        for dropped in range(1, len(starts)):
            kept = without_turns(items, starts, dropped)
            messages = ResponsesRequest(input=kept, instructions="Be kind.").chat_body()
            try:
                chats[dropped] = await client.chat.completions.create(
                    model=MODEL,
                    temperature=0.0,
                    max_completion_tokens=8,
                    messages=messages["messages"],
                )
            except openai.BadRequestError as error:
                assert "context" in str(error)
    fewest = min(chats)
    assert 1 < fewest < len(starts) - 1
    assert all(dropped in chats for dropped in range(fewest, len(starts)))
    chat = chats[fewest]
    assert done.truncation == "auto"
    cut = chat.choices[0].finish_reason == "length"
    assert done.status == ("incomplete" if cut else "completed")
    assert done.usage is not None and chat.usage is not None
    assert done.usage.input_tokens == chat.usage.prompt_tokens
    assert done.usage.input_tokens + 8 <= CONTEXT
    assert done.output_text == chat.choices[0].message.content
    final = streamed[-1].response
    assert final.output_text == done.output_text and final.truncation == "auto"


async def test_a_last_turn_too_long_alone_is_refused_and_a_fitting_input_kept_whole() -> None:
    long_question = " ".join(["word"] * (2 * CONTEXT))
    items = [*_conversation(1), {"role": "user", "content": long_question}]
    async with serving(max_model_len=CONTEXT) as (engine, client):
        with pytest.raises(openai.BadRequestError, match="context"):
            await client.responses.create(
                **GREEDY,
                input=items,  # type: ignore[arg-type]
                truncation="auto",
            )
        short = _conversation(1)
        whole = await client.responses.create(
            **GREEDY,
            input=short,  # type: ignore[arg-type]
            truncation="auto",
        )
        plain = await client.responses.create(**GREEDY, input=short)  # type: ignore[arg-type]
        assert engine.stats().free_blocks == engine.stats().total_blocks
    assert whole.usage is not None and plain.usage is not None
    assert whole.usage.input_tokens == plain.usage.input_tokens
    assert whole.output_text == plain.output_text and plain.truncation == "disabled"


async def test_truncation_takes_only_openais_values() -> None:
    async with serving() as (_, client):
        with pytest.raises(openai.BadRequestError, match="truncation"):
            await client.responses.create(
                **GREEDY,
                input="Hi",
                extra_body={"truncation": "middle"},
            )
