"""A reasoning parser over the API (`medha serve --reasoning-parser`): a chat's thinking in
`message.reasoning` / `delta.reasoning`, its answer in `content` (and its tool calls), whole
and streamed alike; where the prompt opens the thinking, the output starts in it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import groupby
from typing import Any

import openai
import pytest

import medha
from tests.engine_support import MODEL, engine_config
from tests.server_support import MESSAGES, openai_client

pytestmark = pytest.mark.anyio

THOUGHT = "<think>Paris is in France.</think>The capital is Paris."
"""What the random model is made to write (a regex structured output)."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(**app_options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    async with medha.Engine(engine_config()) as engine:
        client, http = openai_client(engine, **app_options)
        async with http:
            yield client


def _literal(text: str) -> dict[str, Any]:
    """Structured outputs that make the model write `text`."""
    regex = "".join("\\" + c if c in "{}[]().*+?|\\^$" else c for c in text)
    return {"structured_outputs": {"regex": regex}}


async def _streamed(client: openai.AsyncOpenAI, **body: Any) -> tuple[str, str, list[str]]:
    """A streamed chat's thinking and answer, added up, and the order its deltas came in (the
    tool calls' as "call NAME")."""
    reasoning, content, order = "", "", []
    async for chunk in await client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning"):
            reasoning += extra["reasoning"]
            order.append("reasoning")
        if delta.content:
            content += delta.content
            order.append("content")
        for call in delta.tool_calls or []:
            assert call.function is not None
            order.append(f"call {call.function.name}")
    return reasoning, content, order


async def test_the_thinking_is_apart_from_the_answer_whole_and_streamed() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60}
    body["extra_body"] = _literal(THOUGHT)
    async with serving(reasoning_parser="qwen3") as client:
        done = await client.chat.completions.create(**body)
        reasoning, content, order = await _streamed(client, **body)
        hide = {**body, "extra_body": {**body["extra_body"], "include_reasoning": False}}
        hidden = await client.chat.completions.create(**hide)
        hidden_stream = await _streamed(client, **hide)
    async with serving() as plain_client:  # no parser: the output as written
        plain = await plain_client.chat.completions.create(**body)
    message = done.choices[0].message
    assert (message.model_extra or {}).get("reasoning") == "Paris is in France."
    assert message.content == "The capital is Paris."
    assert (reasoning, content) == ("Paris is in France.", "The capital is Paris.")
    assert order == sorted(order, key=["reasoning", "content"].index)  # thinking first
    assert "reasoning" not in (hidden.choices[0].message.model_extra or {})
    assert hidden.choices[0].message.content == "The capital is Paris."
    assert hidden_stream == ("", "The capital is Paris.", ["content"] * len(hidden_stream[2]))
    assert plain.choices[0].message.content == THOUGHT
    assert "reasoning" not in (plain.choices[0].message.model_extra or {})


async def test_a_prompt_that_opens_the_thinking_has_the_output_start_in_it() -> None:
    # A template that ends the prompt with "<think>" (here, a prefilled answer continued):
    # the random model's output, which never writes "</think>", is all thinking.
    opened = [*MESSAGES, {"role": "assistant", "content": "<think>\n"}]
    body: dict[str, Any] = {"model": MODEL, "messages": opened, "max_tokens": 12}
    body.update(temperature=0.0)
    body["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
    async with serving(reasoning_parser="qwen3") as client:
        done = await client.chat.completions.create(**body)
        streamed = await _streamed(client, **body)
        closed = await client.chat.completions.create(
            **{**body, "messages": [*MESSAGES, {"role": "assistant", "content": "<think></think>"}]}
        )
    message = done.choices[0].message
    thinking = (message.model_extra or {}).get("reasoning")
    assert thinking and message.content is None
    assert streamed[:2] == (thinking, "")
    # Closed by the prompt: the same kind of output is the answer.
    assert closed.choices[0].message.content
    assert "reasoning" not in (closed.choices[0].message.model_extra or {})


async def test_a_constrained_output_is_the_answer_though_the_prompt_opens_the_thinking() -> None:
    opened = [*MESSAGES, {"role": "assistant", "content": "<think>\n"}]
    body: dict[str, Any] = {"model": MODEL, "messages": opened, "max_tokens": 40}
    body.update(response_format={"type": "json_object"})
    body["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
    async with serving(reasoning_parser="deepseek_r1") as client:
        done = await client.chat.completions.create(**body)
    message = done.choices[0].message
    assert "reasoning" not in (message.model_extra or {})
    assert message.content is not None and message.content.startswith("{")


async def test_tool_calls_are_read_from_the_answer_after_the_thinking() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER]}
    body.update(max_tokens=80, extra_body=_literal(f"<think>Need the weather.</think>{call}"))
    async with serving(reasoning_parser="deepseek_r1", tool_call_parser="hermes") as client:
        done = await client.chat.completions.create(**body)
        streamed = await _streamed(client, **body)
    reasoning, content, order = streamed
    assert (reasoning, content) == ("Need the weather.", "")
    assert [kind for kind, _ in groupby(order)] == ["reasoning", "call get_weather"]
    message = done.choices[0].message
    assert (message.model_extra or {}).get("reasoning") == "Need the weather."
    assert message.tool_calls is not None and done.choices[0].finish_reason == "tool_calls"
    (tool_call,) = message.tool_calls
    assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert not message.content
    async with serving(reasoning_parser="deepseek_r1", tool_call_parser="hermes") as client:
        # The random model's own output, untagged after a prompt that opens nothing: all
        # thinking (deepseek_r1's rule), so no answer and no call.
        thinking = await client.chat.completions.create(
            **{**body, "extra_body": {}, "max_tokens": 8, "temperature": 0.0}
        )
    message = thinking.choices[0].message
    assert (message.model_extra or {}).get("reasoning")
    assert message.content is None and not message.tool_calls
    assert thinking.choices[0].finish_reason == "length"
