"""A reasoning parser over the API (`medha serve --reasoning-parser`): a chat's thinking in
`message.reasoning` / `delta.reasoning`, its answer in `content` (and its tool calls), whole
and streamed alike; where the prompt opens the thinking, the output starts in it."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import groupby
from typing import Any

import openai
import pytest

import medha
from medha.server.reasoning import ReasoningParser
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
    """Structured outputs that make the model write `text`, its thinking included (so they
    hold from the first token: `thinking` False)."""
    regex = "".join("\\" + c if c in "{}[]().*+?|\\^$" else c for c in text)
    return {"structured_outputs": {"regex": regex, "thinking": False}}


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
        # Continued mid-thought: the message's last tag is open, though text follows it.
        mid = [*MESSAGES, {"role": "assistant", "content": "<think>Let me think"}]
        going_on = await client.chat.completions.create(**{**body, "messages": mid})
    message = done.choices[0].message
    thinking = (message.model_extra or {}).get("reasoning")
    assert thinking and message.content is None
    assert streamed[:2] == (thinking, "")
    message = going_on.choices[0].message
    assert (message.model_extra or {}).get("reasoning") and message.content is None
    # Closed by the prompt: the same kind of output is the answer.
    assert closed.choices[0].message.content
    assert "reasoning" not in (closed.choices[0].message.model_extra or {})


async def test_a_constrained_output_thinks_first_where_the_prompt_lets_it() -> None:
    # A parser of tags that are one token each (so the random model can write them);
    # untagged, the output thinks (as DeepSeek-R1's). While it thinks, the random model is kept to a few
    # tokens, the end tag among them; the choice's tokens are not, and the grammar wins where
    # the two share none, so the answer is the grammar's alone.
    brackets = ReasoningParser(untagged_is_reasoning=True, start="[", end="]")
    async with medha.Engine(engine_config()) as engine:
        allowed = [engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in "ab]"]
        client, http = openai_client(engine, reasoning_parser=brackets)
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60}
        body["extra_body"] = {
            "structured_outputs": {"choice": ["yes", "no"]},
            "allowed_token_ids": allowed,
        }
        async with http:
            done = [await client.chat.completions.create(**body, seed=seed) for seed in range(4)]
            streamed = await _streamed(client, **body, seed=0)
            closed = [*MESSAGES, {"role": "assistant", "content": "[]"}]  # no thinking
            extra = {**body["extra_body"], "continue_final_message": True}
            extra["add_generation_prompt"] = False
            answer = await client.chat.completions.create(
                **{**body, "messages": closed, "extra_body": extra}
            )
    for choice in (response.choices[0] for response in done):
        assert re.fullmatch("[ab]*", (choice.message.model_extra or {})["reasoning"])
        assert choice.message.content in ("yes", "no")
        assert choice.finish_reason == "stop"
    first = done[0].choices[0].message
    assert streamed[:2] == ((first.model_extra or {})["reasoning"], first.content)
    assert any((r.choices[0].message.model_extra or {})["reasoning"] for r in done)  # thought
    assert "reasoning" not in (answer.choices[0].message.model_extra or {})
    assert answer.choices[0].message.content in ("yes", "no")


async def test_a_named_tool_call_follows_the_thinking() -> None:
    brackets = ReasoningParser(untagged_is_reasoning=True, start="[", end="]")
    city = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}}
    city.update(required=["city"], additionalProperties=False)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": city}}
    async with medha.Engine(engine_config()) as engine:
        allowed = [engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in "ab]"]
        client, http = openai_client(engine, reasoning_parser=brackets)
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 80}
        body.update(tools=[tool], seed=2, extra_body={"allowed_token_ids": allowed})
        body["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
        async with http:
            done = await client.chat.completions.create(**body)
            # Kept from the end tag, the model never answers: no call, whole or streamed.
            never_ends = {**body, "max_tokens": 5, "extra_body": {"allowed_token_ids": allowed[:2]}}
            thought = await client.chat.completions.create(**never_ends)
            thought_streamed = await _streamed(client, **never_ends)
    unanswered = thought.choices[0].message
    assert unanswered.content is None and not unanswered.tool_calls
    assert thought.choices[0].finish_reason == "length"
    assert thought_streamed == ((unanswered.model_extra or {})["reasoning"], "", ["reasoning"] * 5)
    message = done.choices[0].message
    assert re.fullmatch("[ab]*", (message.model_extra or {})["reasoning"])
    (call,) = message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    assert message.content is None


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


async def test_a_requests_own_thinking_says_where_its_output_starts() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "seed": 1}
    never = {"structured_outputs": {"json_object": True, "thinking": False}}
    other_tags = {"structured_outputs": {"json_object": True, "thinking": {"end": "</t>"}}}
    async with serving(reasoning_parser="deepseek_r1") as client:
        done = await client.chat.completions.create(**{**body, "extra_body": never})
        streamed = await _streamed(client, **{**body, "extra_body": never})
        with pytest.raises(openai.BadRequestError, match="not the reasoning parser's"):
            await client.chat.completions.create(**{**body, "extra_body": other_tags})
    # The grammar holds from the first token: the JSON is the answer, not thinking (which
    # the parser would read an untagged output as).
    message = done.choices[0].message
    assert "reasoning" not in (message.model_extra or {})
    assert message.content is not None and message.content.startswith("{")
    assert streamed[:2] == ("", message.content)


QWEN3_FINAL_TURN = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ message.content }}{% if not loop.last %}<|im_end|>\n{% endif %}{%- endfor %}"
)
"""Qwen 3's templates write the last assistant turn's thinking (empty here) before its text."""


@pytest.mark.parametrize("through_kwargs", [False, True], ids=["field", "chat_template_kwargs"])
async def test_a_continued_answer_after_the_templates_thinking_is_the_answer(
    through_kwargs: bool,
) -> None:
    """deepseek_r1 reads untagged output as thinking; after a template's `</think>` before
    the continued message's text, the continuation is the answer (its grammar holds from the
    first token). continue_final_message counts given in chat_template_kwargs too, as vLLM
    takes it there."""
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    extra = {"chat_template_kwargs": flags} if through_kwargs else dict(flags)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 0.0}
    body["extra_body"] = {**extra, "structured_outputs": {"choice": [" Paris."]}}
    async with medha.Engine(engine_config()) as engine:
        engine.tokenizer.hf_tokenizer.chat_template = QWEN3_FINAL_TURN
        client, http = openai_client(engine, reasoning_parser="deepseek_r1")
        async with http:
            answer = [*MESSAGES, {"role": "assistant", "content": "The capital is"}]
            done = await client.chat.completions.create(**body, messages=answer)
            thought = [*MESSAGES, {"role": "assistant", "content": "<think>Hmm, the capital"}]
            extra_thought = {**body["extra_body"]}
            extra_thought.pop("structured_outputs")
            going_on = await client.chat.completions.create(
                **{**body, "extra_body": extra_thought}, messages=thought
            )
    message = done.choices[0].message
    assert message.content == " Paris." and not (message.model_extra or {}).get("reasoning")
    message = going_on.choices[0].message
    assert (message.model_extra or {}).get("reasoning") and message.content is None
