"""OpenAI's tools on /v1/chat/completions, through OpenAI's client: a named function and
"required" constrain the output to calls, "auto" reads the calls the model wrote with the
server's parser, whole and streamed alike; the tools and earlier calls reach the chat template;
and what cannot be done is a 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import openai
import pytest

import medha
from medha.server import create_app
from medha.server.tool_parsers import FunctionCall, ParsedOutput
from tests.engine_support import MODEL, engine_config

pytestmark = pytest.mark.anyio

CITY = {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(parser: Any = None) -> AsyncIterator[tuple[medha.Engine, Any, Any]]:
    """An engine, OpenAI's client of its app (with `parser` for "auto"), and the HTTP client."""
    async with medha.Engine(engine_config()) as engine:
        app = create_app(engine, tool_call_parser=parser)
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://m")
        client = openai.AsyncOpenAI(
            api_key="unused", base_url="http://m/v1", http_client=http, max_retries=0
        )
        async with http:
            yield engine, client, http


async def _streamed(client: Any, **body: Any) -> tuple[dict[str, Any], str | None]:
    """The message a client adds up from a streamed response's deltas, and its finish reason."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    async for chunk in await client.chat.completions.create(**body, stream=True):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            whole = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            if call.id is not None:
                assert whole["id"] is None, "a call's id comes once, on its first delta"
                whole["id"] = call.id
                whole["name"] = call.function.name
            whole["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    message = {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}
    return message, finish


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


async def test_a_named_function_is_called_with_arguments_under_its_schema() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME]}
    body.update(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    body.update(temperature=0, max_tokens=40)
    async with serving() as (_, client, _http):
        done = await client.chat.completions.create(**body)
        streamed, finish = await _streamed(client, **body)
    choice = done.choices[0]
    ((name, arguments),) = _calls(choice.message)
    assert name == "get_weather" and set(arguments) == {"city"}
    assert arguments["city"] in CITY["enum"]
    assert choice.message.content is None
    assert choice.message.tool_calls[0].id.startswith("call_")
    assert choice.finish_reason == "stop"  # as OpenAI's, for a named function
    # Streamed: the same call, its arguments as the model wrote them.
    (call,) = streamed["tool_calls"]
    assert (call["name"], call["arguments"]) == (
        "get_weather",
        done.choices[0].message.tool_calls[0].function.arguments,
    )
    assert streamed["content"] is None and finish == "stop"


async def test_required_calls_one_or_more_of_the_tools() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME]}
    body.update(tool_choice="required", temperature=0.8, seed=4, max_tokens=120)
    async with serving() as (_, client, _http):
        done = await client.chat.completions.create(**body)
        streamed, finish = await _streamed(client, **body)
        single = await client.chat.completions.create(**body, parallel_tool_calls=False, n=3)
    calls = _calls(done.choices[0].message)
    assert len(calls) == 2 and done.choices[0].finish_reason == "tool_calls"  # this seed's
    for name, arguments in calls:
        assert name in {"get_weather", "get_time"}
        assert set(arguments) == ({"city"} if name == "get_weather" else set())
    # The same seed: the stream carries the same calls, whole, when the choice ends.
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"]] == calls
    assert streamed["content"] is None and finish == "tool_calls"
    for choice in single.choices:
        assert len(_calls(choice.message)) == 1 and choice.finish_reason == "tool_calls"


HERMES_CALL = (
    'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
)


def _regex(text: str) -> str:
    return "".join("\\" + c if c in "{}[]().*+?|\\^$" else c for c in text)


async def test_auto_reads_the_calls_the_model_writes() -> None:
    # The random model is made to write a call in hermes' format (a regex), as a model that
    # chose to call a tool would; the server's parser reads it.
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER]}
    body.update(max_tokens=80, extra_body={"structured_outputs": {"regex": _regex(HERMES_CALL)}})
    async with serving("hermes") as (_, client, _http):
        done = await client.chat.completions.create(**body)  # tool_choice: "auto" by default
        streamed, finish = await _streamed(client, **body, tool_choice="auto")
        text_only = await client.chat.completions.create(
            **{**body, "extra_body": {"structured_outputs": {"regex": "Fine, thanks"}}}
        )
        ignored = await client.chat.completions.create(**body, tool_choice="none")
    choice = done.choices[0]
    assert choice.message.content == "Let me check. "
    assert _calls(choice.message) == [("get_weather", {"city": "Oslo"})]
    assert choice.finish_reason == "tool_calls"
    assert streamed["content"] == "Let me check. " and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"]] == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert text_only.choices[0].message.content == "Fine, thanks"
    assert not text_only.choices[0].message.tool_calls
    assert text_only.choices[0].finish_reason == "stop"
    # "none": the same output is text.
    assert ignored.choices[0].message.content == HERMES_CALL
    assert not ignored.choices[0].message.tool_calls
    async with serving("llama3_json") as (_, client, _http):
        call = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
        body["extra_body"] = {"structured_outputs": {"regex": _regex(call)}}
        done = await client.chat.completions.create(**body)
        streamed, finish = await _streamed(client, **body)
    assert _calls(done.choices[0].message) == [("get_weather", {"city": "Rome"})]
    assert done.choices[0].message.content is None
    assert streamed["content"] is None and finish == "tool_calls"


DAY = {"type": "string", "enum": ["mon", "tue"]}
BOOK = {  # parameters with $defs, as pydantic writes them
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "type": "object",
            "properties": {"day": {"$ref": "#/$defs/Day"}},
            "required": ["day"],
            "additionalProperties": False,
            "$defs": {"Day": DAY},
        },
    },
}
TREE = {  # a recursive schema: "#" is the function's parameters
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {
            "type": "object",
            "properties": {
                "v": {"type": "integer", "minimum": 0, "maximum": 9},
                "kids": {"type": "array", "maxItems": 1, "items": {"$ref": "#"}},
            },
            "required": ["v", "kids"],
            "additionalProperties": False,
        },
    },
}


def _is_tree(value: Any) -> bool:
    return (
        set(value) == {"v", "kids"}
        and 0 <= value["v"] <= 9
        and len(value["kids"]) <= 1
        and all(_is_tree(kid) for kid in value["kids"])
    )


async def test_references_in_parameters_point_where_they_did() -> None:
    # "required" puts every tool's schema into one: their $refs must still resolve, each in
    # its own tool's schema.
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [BOOK, TREE]}
    body.update(tool_choice="required", temperature=1.0, max_tokens=150)
    seen = set()
    async with serving() as (_, client, _http):
        for seed in range(6):
            done = await client.chat.completions.create(**body, seed=seed)
            for name, arguments in _calls(done.choices[0].message):
                seen.add(name)
                if name == "book":
                    assert arguments["day"] in DAY["enum"]
                else:
                    assert _is_tree(arguments), arguments
        named = await client.chat.completions.create(
            **{**body, "tool_choice": {"type": "function", "function": {"name": "book"}}}
        )
    assert seen == {"book", "tree"}
    assert (
        json.loads(named.choices[0].message.tool_calls[0].function.arguments)["day"] in DAY["enum"]
    )


async def test_a_function_without_parameters_is_called_with_an_object() -> None:
    ping = {"type": "function", "function": {"name": "ping", "parameters": {}}}
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [ping], "max_tokens": 30}
    body["tool_choice"] = {"type": "function", "function": {"name": "ping"}}
    async with serving() as (_, client, _http):
        for seed in range(3):
            done = await client.chat.completions.create(**body, seed=seed)
            arguments = done.choices[0].message.tool_calls[0].function.arguments
            if done.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(arguments), dict)
            else:  # cut short: still the start of an object
                assert arguments.startswith("{")


class _LineParser:
    """A parser of a made-up format, as a user's own: `CALL name` on a line ends the text."""

    def extract(self, text: str) -> ParsedOutput:
        content, _, name = text.partition("CALL ")
        if not name:
            return ParsedOutput(text, ())
        return ParsedOutput(content or None, (FunctionCall(name.strip(), "{}"),))

    def held_from(self, text: str) -> int:
        return len(text) if "C" not in text else text.index("C")


async def test_a_parser_of_ones_own() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [TIME], "max_tokens": 40}
    body["extra_body"] = {"structured_outputs": {"regex": "Now: CALL get_time"}}
    async with serving(_LineParser()) as (_, client, _http):
        done = await client.chat.completions.create(**body)
        streamed, finish = await _streamed(client, **body)
    assert done.choices[0].message.content == "Now: "
    assert _calls(done.choices[0].message) == [("get_time", {})]
    assert streamed["content"] == "Now: " and finish == "tool_calls"


TEMPLATE = (  # a newline after a block tag is trimmed (transformers' trim_blocks): '\n'
    "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}{{ '\\n' }}"
    "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
    "{% if m.tool_calls is defined and not m.tool_calls %}{{ raise_exception('[]') }}{% endif %}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}"
    "({{ c.function.arguments.city or '' }}){% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


async def test_tools_and_earlier_calls_reach_the_chat_template(monkeypatch: Any) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        # As vLLM takes them: no calls ([]) are none, and no arguments ("") are {}.
        {"role": "assistant", "content": "So?", "tool_calls": []},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "get_time", "arguments": ""}}],
        },
    ]
    async with serving() as (engine, client, http):
        monkeypatch.setattr(engine.tokenizer.hf_tokenizer, "chat_template", TEMPLATE)
        tokens = await http.post("/tokenize", json={"messages": history, "tools": [WEATHER, TIME]})
        done = await client.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=1
        )
    ids = tokens.json()["tokens"]
    assert engine.tokenizer.decode(ids) == (
        "TOOLS: get_weather get_time\nuser: What is the weather in Paris?\n"
        "assistant:  CALL get_weather(Paris)\ntool: Sunny\nassistant: So?\n"
        "assistant:  CALL get_time()\nassistant:"
    )
    assert done.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [WEATHER]}, 'tool_choice "auto" needs a tool-call parser'),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "'x', which is not in tools",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "give one of",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                    }
                ],
                "tools": [WEATHER],
                "tool_choice": "none",
            },
            "messages[0].tool_calls[0].function.arguments is not JSON",
        ),
        ({"functions": [WEATHER["function"]]}, "functions is not supported"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "different names"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "different names"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "1" * 5000}}],
                    }
                ],
                "tools": [WEATHER],
                "tool_choice": "none",
            },
            "arguments is not JSON",  # an integer longer than Python converts
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ],
                "tool_choice": "required",
            },
            "must be an object schema, got type 'string'",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
                        ],
                    }
                ],
                "tools": [WEATHER],
                "tool_choice": "none",
            },
            "arguments is not JSON",
        ),
    ],
)
async def test_what_tools_cannot_do_is_a_400(fields: dict[str, Any], message: str) -> None:
    async with serving() as (engine, _client, http):
        body = {"messages": ASK, "max_tokens": 1, **fields}
        answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 400, answer.text
        assert message in answer.json()["error"]["message"]
        tokenized = await http.post("/tokenize", json={"prompt": "x", "tools": [WEATHER]})
        assert tokenized.status_code == 400
        assert "are taken with `messages`" in tokenized.json()["error"]["message"]
        assert engine.stats().running == 0 and engine.stats().waiting == 0
