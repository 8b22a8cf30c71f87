"""OpenAI's Responses API (`POST /v1/responses`) through OpenAI's client: a request is the chat
request it means (same prompt, same output), its output items are the chat choice's (thinking,
answer, function calls), a streamed response's events add up to the whole response, and what
medha cannot do is refused."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

import medha
from medha.server.openai_responses import ResponsesRequest
from medha.server.reasoning import ReasoningParser
from medha.server.responses_stream import response_event_stream
from tests.engine_support import MODEL, engine_config
from tests.server_support import openai_client

pytestmark = pytest.mark.anyio

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"enum": ["Oslo", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
ABOUT = {"description": "The weather now.", "strict": True}
WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS, **ABOUT}
CHAT_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS, **ABOUT},
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
BRACKETS = ReasoningParser(untagged_is_reasoning=True, start="[", end="]")
"""As in test_server_reasoning: tags of one token each (so the random model can write them);
untagged, the output thinks."""


def _thinking_tokens(engine: medha.Engine) -> list[int]:
    """A few tokens, the end tag among them: the random model kept to them while it thinks
    ends its thinking soon; what follows is the grammar's (they share no token with it)."""
    return [engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in "ab]"]


def _regex(text: str) -> str:
    return "".join("\\" + c if c in "{}[]().*+?|\\^$" else c for c in text)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(**app_options: Any) -> AsyncIterator[tuple[medha.Engine, openai.AsyncOpenAI]]:
    async with medha.Engine(engine_config()) as engine:
        client, http = openai_client(engine, **app_options)
        async with http:
            yield engine, client


def _without_ids(value: Any) -> Any:
    """`value` with its generated ids left out (they differ between two runs)."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "call_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def _counts(usage: Any) -> tuple[int, int, int, int]:
    """A usage's counts but the cached ones (a request's repeat finds its prompt cached)."""
    reasoning = usage.output_tokens_details.reasoning_tokens
    return usage.input_tokens, usage.output_tokens, reasoning, usage.total_tokens


async def _streamed(client: openai.AsyncOpenAI, **body: Any) -> list[Any]:
    return [event async for event in await client.responses.create(**body, stream=True)]


ITEM_OPENS = {
    "message": ["output_item.added", "content_part.added"],
    "reasoning": ["output_item.added"],
    "function_call": ["output_item.added"],
}
ITEM_CLOSES = {
    "message": ["output_text.done", "content_part.done", "output_item.done"],
    "reasoning": ["reasoning_text.done", "output_item.done"],
    "function_call": ["function_call_arguments.done", "output_item.done"],
}


def _check_events(events: list[Any]) -> Any:
    """The events are numbered in order, each item opens and closes before the next, the
    deltas add up to what each item holds at its end; the last event's response."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1]
    assert final.type == f"response.{final.response.status}"
    texts: dict[str, str] = {}
    for event in events[2:-1]:
        if event.type.endswith(".delta"):
            texts[event.item_id] = texts.get(event.item_id, "") + event.delta
    done = [e.item for e in events if e.type == "response.output_item.done"]
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.id for item in added] == [item.id for item in done]
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == list(
        range(len(done))
    )
    for item in done:
        if item.type == "function_call":
            assert texts.get(item.id, "") == item.arguments
        else:
            assert texts.get(item.id, "") == (item.content[0].text if item.content else "")
    assert [item.model_dump() for item in done] == [o.model_dump() for o in final.response.output]
    # Each item's events in OpenAI's order, one item after the other.
    indices = [e.output_index for e in events[2:-1]]
    assert indices == sorted(indices)
    for index, item in enumerate(done):
        kinds = [e.type.removeprefix("response.") for e in events[2:-1] if e.output_index == index]
        inner = [kind for kind in kinds if kind.endswith(".delta")]
        assert kinds == [*ITEM_OPENS[item.type], *inner, *ITEM_CLOSES[item.type]], item.type
        assert set(inner) <= {ITEM_CLOSES[item.type][0].replace(".done", ".delta")}
    # Every event has what OpenAI's types require (the client builds them unchecked).
    for event in events:
        type(event).model_validate(event.model_dump(exclude_unset=True))
    return final.response


async def test_a_text_request_is_the_chat_it_means_whole_and_streamed() -> None:
    greedy: dict[str, Any] = {"model": MODEL, "temperature": 0.0}
    async with serving() as (_, client):
        chat = await client.chat.completions.create(
            **greedy,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_completion_tokens=12,
        )
        body = {**greedy, "instructions": "Be brief.", "input": "Hi", "max_output_tokens": 12}
        whole = await client.responses.create(**body)
        events = await _streamed(client, **body)
        cut = await client.responses.create(**{**body, "max_output_tokens": 3})
        cut_streamed = _check_events(await _streamed(client, **{**body, "max_output_tokens": 3}))
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage is not None and chat.usage is not None
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert whole.usage.total_tokens == chat.usage.total_tokens
    # The chat request computed the prompt first: its whole KV blocks came from the cache.
    cached = whole.usage.input_tokens_details
    assert cached.cached_tokens == whole.usage.input_tokens // 16 * 16 > 0
    assert cached.cache_write_tokens == 0
    assert whole.object == "response" and whole.id.startswith("resp_")
    assert whole.model == MODEL and whole.instructions == "Be brief."
    assert whole.text.format.type == "text" and whole.tools == [] and whole.store is False
    (item,) = whole.output
    assert item.type == "message" and item.role == "assistant"
    streamed = _check_events(events)
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        whole.model_dump()["output"]
    )
    assert _counts(streamed.usage) == _counts(whole.usage)
    # Cut short by max_output_tokens: incomplete, saying why, whole and streamed alike.
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete" and cut.usage.output_tokens == 3
    assert _without_ids(cut_streamed.model_dump()["output"]) == _without_ids(
        cut.model_dump()["output"]
    )
    assert cut_streamed.status == "incomplete"


async def test_an_empty_answer_is_an_empty_message_whole_and_streamed() -> None:
    async with serving() as (engine, client):
        eos = engine.tokenizer.eos_token_ids[0]
        body = {"model": MODEL, "input": "Hi", "extra_body": {"allowed_token_ids": [eos]}}
        done = await client.responses.create(**body)
        streamed = _check_events(await _streamed(client, **body))
    (message,) = done.output
    assert message.type == "message" and done.output_text == "" and done.status == "completed"
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )


async def test_a_conversation_with_function_calls_is_the_chat_history_it_means() -> None:
    greedy: dict[str, Any] = {"model": MODEL, "temperature": 0.0, "max_output_tokens": 10}
    oslo, rome = '{"city": "Oslo"}', '{"city": "Rome"}'
    calls = [("call_1", oslo, "Sunny, 21 C"), ("call_2", rome, "Rain, 12 C")]
    items: list[dict[str, Any]] = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # earlier thinking: dropped
    ]
    items += [
        {"type": "function_call", "call_id": i, "name": "get_weather", "arguments": a}
        for i, a, _ in calls
    ]
    items += [{"type": "function_call_output", "call_id": i, "output": o} for i, _, o in calls]
    items.append({"role": "user", "content": "And so?"})
    chat_calls = [
        {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": a}}
        for i, a, _ in calls
    ]
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": chat_calls},  # both calls in one
        *({"role": "tool", "tool_call_id": i, "content": o} for i, _, o in calls),
        {"role": "user", "content": "And so?"},
    ]
    async with serving() as (_, client):
        done = await client.responses.create(
            **greedy,
            input=items,
            tools=[WEATHER],
            tool_choice="none",  # type: ignore[arg-type]
        )
        chat = await client.chat.completions.create(
            model=MODEL,
            temperature=0.0,
            max_completion_tokens=10,
            messages=messages,  # type: ignore[arg-type]
            tools=[CHAT_WEATHER],  # type: ignore[list-item]
            tool_choice="none",
        )
    assert done.output_text == chat.choices[0].message.content
    assert done.usage is not None and chat.usage is not None
    assert done.usage.input_tokens == chat.usage.prompt_tokens
    # The test model's chat template shows no tool calls: the messages themselves are checked.
    request = ResponsesRequest(model=MODEL, input=items, tools=[WEATHER], tool_choice="none")
    assert request.chat_body()["messages"] == messages
    assert request.chat_body()["tools"] == [CHAT_WEATHER]


async def test_a_named_function_is_called_whole_and_streamed() -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "Weather?", "tools": [WEATHER]}
    body.update(tool_choice={"type": "function", "name": "get_weather"}, temperature=0.0)
    async with serving() as (_, client):
        done = await client.responses.create(**body, max_output_tokens=40)
        events = await _streamed(client, **body, max_output_tokens=40)
    (call,) = done.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert json.loads(call.arguments)["city"] in ("Oslo", "Rome")
    assert done.status == "completed" and done.output_text == ""
    streamed = _check_events(events)
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )
    assert done.tool_choice.name == "get_weather" and done.tools[0].name == "get_weather"


async def test_a_json_schema_format_is_the_output_of_its_schema() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    schema["additionalProperties"] = False
    text_format = {"format": {"type": "json_schema", "name": "verdict", "schema": schema}}
    async with serving() as (_, client):
        done = await client.responses.create(
            model=MODEL, input="Ok?", text=text_format, extra_body={"seed": 2}, max_output_tokens=80
        )
    assert done.status == "completed"
    assert isinstance(json.loads(done.output_text)["ok"], bool)
    # A first request: it computed its prompt, and the prefix cache keeps its whole blocks.
    assert done.usage is not None
    written = done.usage.input_tokens_details.cache_write_tokens
    assert written == done.usage.input_tokens // 16 * 16 > 0
    assert done.text.format.type == "json_schema"


async def test_thinking_is_a_reasoning_item_before_the_answer() -> None:
    # As in test_server_reasoning: tags of one token each, the model kept to a few tokens
    # while it thinks (the end tag among them), the answer a choice.
    brackets = ReasoningParser(untagged_is_reasoning=True, start="[", end="]")
    async with serving(reasoning_parser=brackets) as (engine, client):
        allowed = [engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in "ab]"]
        body: dict[str, Any] = {"model": MODEL, "input": "Yes?", "max_output_tokens": 60}
        body["extra_body"] = {
            "structured_outputs": {"choice": ["yes", "no"]},
            "allowed_token_ids": allowed,
            "seed": 0,
        }
        done = await client.responses.create(**body)
        events = await _streamed(client, **body)
        tokenizer = engine.tokenizer
    thinking, answer = done.output
    assert thinking.type == "reasoning" and thinking.content is not None
    thought = thinking.content[0].text
    assert thought and re.fullmatch("[ab]*", thought)
    assert answer.type == "message" and done.output_text in ("yes", "no")
    assert done.usage is not None
    assert done.usage.output_tokens_details.reasoning_tokens <= done.usage.output_tokens
    assert done.usage.output_tokens_details.reasoning_tokens == len(
        tokenizer.encode(thought, add_special_tokens=False)
    )
    streamed = _check_events(events)
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )
    assert _counts(streamed.usage) == _counts(done.usage)
    kinds = [e.type for e in events if e.type.endswith(".delta")]
    assert kinds == sorted(
        kinds, key=["response.reasoning_text.delta", "response.output_text.delta"].index
    )


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"previous_response_id": "resp_1"}, "keeps no responses"),
        ({"background": True}, "background is not supported"),
        ({"tools": [{"type": "web_search"}]}, "no built-in tools"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input_image"),
        ({"input": [{"role": "tool", "content": "x"}]}, "role must be"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "call_id"),
        ({"input": []}, "input is empty"),
        ({"extra_body": {"n": 2}}, "n is chat's"),
        ({"extra_body": {"echo": True}}, "echo is chat's"),
        ({"extra_body": {"include_reasoning": False}}, "include_reasoning is chat's"),
        ({"extra_body": {"logprobs": True}}, "logprobs is chat's"),
        ({"extra_body": {"messages": [{"role": "user", "content": "x"}]}}, "messages is chat's"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format is"),
        ({"tools": [{"type": "function", "parameters": {}}]}, "tools.0.function.name"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice must be"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"text": {"format": "json"}}, "text.format must be an object"),
        ({"text": {"format": [{"type": "text"}]}}, "text.format must be an object"),
        ({"temperature": -1}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens must be >= 1"),
    ],
)
async def test_what_medha_cannot_do_is_refused(body: dict[str, Any], problem: str) -> None:
    request = {"model": MODEL, "input": "Hi", **body}
    async with serving() as (engine, client):
        with pytest.raises(openai.BadRequestError, match=problem):
            await client.responses.create(**request)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="other", input="Hi")
        stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and stats.running == 0


async def test_an_error_after_the_stream_began_is_an_error_event() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "response.created", "sequence_number": 0}
        raise medha.GrammarViolationError("token 7 breaks the request's structured output")

    response = response_event_stream(events())  # type: ignore[arg-type]
    sent = "".join([chunk async for chunk in response.body_iterator])  # type: ignore[misc]
    created, error, rest = sent.split("\n\n", 2)
    assert created.startswith("event: response.created\ndata: ") and rest == ""
    kind, data = error.split("\n")
    assert kind == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error",
        "code": "server_error",
        "message": "token 7 breaks the request's structured output",
        "param": None,
        "sequence_number": 1,
    }


async def test_a_named_call_after_thinking_and_one_cut_short() -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "Weather?", "tools": [WEATHER]}
    body["tool_choice"] = {"type": "function", "name": "get_weather"}
    async with serving(reasoning_parser=BRACKETS) as (engine, client):
        body["extra_body"] = {"allowed_token_ids": _thinking_tokens(engine), "seed": 0}
        done = await client.responses.create(**body, max_output_tokens=60)
        streamed = _check_events(await _streamed(client, **body, max_output_tokens=60))
        cut = await client.responses.create(**body, max_output_tokens=6)
        cut_streamed = _check_events(await _streamed(client, **body, max_output_tokens=6))
    thinking, call = done.output
    assert thinking.type == "reasoning" and call.type == "function_call"
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Oslo", "Rome")
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )
    # Cut short in its arguments: the call is incomplete, and so is the response.
    assert cut.status == "incomplete" and cut.output[-1].type == "function_call"
    assert cut.output[-1].status == "incomplete"
    assert _without_ids(cut_streamed.model_dump()["output"]) == _without_ids(
        cut.model_dump()["output"]
    )


async def test_an_empty_thinking_is_no_reasoning_item() -> None:
    async with serving(reasoning_parser=BRACKETS) as (engine, client):
        end = engine.tokenizer.encode("]", add_special_tokens=False)
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
        body["extra_body"] = {"allowed_token_ids": end}  # "]" at once: no thinking, no answer
        done = await client.responses.create(**body)
        streamed = _check_events(await _streamed(client, **body))
    assert [item.type for item in done.output] == ["message"] and done.output_text == ""
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )


async def test_auto_reads_text_and_calls_in_order_whole_and_streamed() -> None:
    call = '<tool_call>{{"name": "get_weather", "arguments": {{"city": "{}"}}}}</tool_call>'
    written = "Checking. " + call.format("Oslo") + call.format("Rome")
    body: dict[str, Any] = {"model": MODEL, "input": "Weather?", "tools": [WEATHER, TIME]}
    body.update(max_output_tokens=120, tool_choice="auto")
    body["extra_body"] = {"structured_outputs": {"regex": _regex(written)}}
    async with serving(tool_call_parser="hermes") as (_, client):
        done = await client.responses.create(**body)
        streamed = _check_events(await _streamed(client, **body))
        no_tools = await client.responses.create(model=MODEL, input="Hi", tool_choice="auto")
    message, *calls = done.output
    assert message.type == "message" and done.output_text == "Checking. "
    assert [(c.type, c.name, json.loads(c.arguments)) for c in calls] == [
        ("function_call", "get_weather", {"city": "Oslo"}),
        ("function_call", "get_weather", {"city": "Rome"}),
    ]
    assert len({c.call_id for c in calls}) == 2
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )
    assert no_tools.status in ("completed", "incomplete")  # "auto" without tools: no calls


def test_a_request_is_translated_field_for_field() -> None:
    schema = {"type": "object"}
    text_format = {"type": "json_schema", "name": "obj", "schema": schema, "strict": True}
    request = ResponsesRequest(
        model=MODEL,
        input="Hi",
        tools=[WEATHER],
        parallel_tool_calls=False,
        text={"format": text_format},
        max_output_tokens=7,
        top_k=3,  # vLLM's extras pass on
    )
    body = request.chat_body()
    assert body["tools"] == [CHAT_WEATHER] and body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "obj", "schema": schema, "strict": True},
    }
    assert (body["max_completion_tokens"], body["top_k"]) == (7, 3)
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    # JSON's null is a field's default, as on the other endpoints.
    assert ResponsesRequest.model_validate({"input": "Hi", "stream": None}).stream is False


async def test_a_named_call_cut_short_while_thinking_is_no_call() -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "Weather?", "tools": [WEATHER]}
    body.update(tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=5)
    async with serving(reasoning_parser=BRACKETS) as (engine, client):
        never_ends = _thinking_tokens(engine)[:2]  # without the end tag
        body["extra_body"] = {"allowed_token_ids": never_ends, "seed": 0, "n": 1, "echo": False}
        done = await client.responses.create(**body)
        streamed = _check_events(await _streamed(client, **body))
    (thinking,) = done.output  # no call: the model never answered
    assert thinking.type == "reasoning" and thinking.status == "incomplete"
    assert done.status == "incomplete"
    assert _without_ids(streamed.model_dump()["output"]) == _without_ids(
        done.model_dump()["output"]
    )
