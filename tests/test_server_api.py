"""medha's OpenAI-compatible API (medha.server), spoken to by OpenAI's own Python client in
process (no socket): outputs equal the Engine's for the same prompt and parameters, streamed
and not; chat renders the model's template; n and several prompts are choices in OpenAI's order;
response_format constrains the output; every refusal is a 400 (404 for another model) in
OpenAI's error shape, queues nothing and disturbs no other request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import openai
import pytest

import medha
from medha import SamplingParams
from medha.server import create_app
from tests.engine_support import MODEL, engine_config

pytestmark = pytest.mark.anyio

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def openai_client(engine: medha.Engine) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    """OpenAI's client of `engine`'s app, and the HTTP client under it (no socket)."""
    transport = httpx2.ASGITransport(app=create_app(engine))
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


async def _idle(engine: medha.Engine) -> medha.EngineStats:
    with anyio.fail_after(10):
        while (stats := engine.stats()).running or stats.waiting:
            await anyio.sleep(0.01)
    assert stats.free_blocks == stats.total_blocks
    return stats


async def test_a_completion_is_the_engines_with_its_logprobs_and_usage() -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    async with serving() as (engine, client):
        reference = await engine.generate(PROMPT, params)
        events = [ev async for ev in engine.stream(PROMPT, params)]
        done = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0.0,
            logprobs=2,
            extra_body={"ignore_eos": True},
        )
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=10,
                temperature=0.0,
                logprobs=2,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        ]
    (choice,) = done.choices
    assert choice.text == reference.text and choice.finish_reason == "length"
    assert done.object == "text_completion" and done.model == MODEL
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
        len(reference.prompt_token_ids),
        10,
    )
    assert choice.logprobs is not None and reference.top_logprobs is not None
    assert choice.logprobs.token_logprobs == pytest.approx(reference.logprobs)
    strings = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in reference.token_ids]
    assert choice.logprobs.tokens == strings
    # Where each token's text starts in the choice's text: after what the events before it said.
    offsets = [len("".join(ev.text for ev in events[:i])) for i in range(len(events))]
    assert choice.logprobs.text_offset == offsets
    assert choice.logprobs.top_logprobs is not None
    for top, expected in zip(choice.logprobs.top_logprobs, reference.top_logprobs, strict=True):
        # Keyed by text: alternatives of one text (U+FFFD) keep the most likely.
        texts = {engine.tokenizer.decode([t.token_id], skip_special_tokens=False) for t in expected}
        assert len(top) == len(texts) and max(top.values()) == pytest.approx(expected[0].logprob)
        assert all(any(v == pytest.approx(t.logprob) for t in expected) for v in top.values())
    metrics = choice.model_extra["metrics"]  # type: ignore[index]
    assert metrics["deadline_met"] is True and metrics["ttft"] > 0
    # Streamed: a chunk per token, each with its row of the same table.
    assert len(chunks) == 10
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [getattr(c.choices[0].logprobs, name)[0] for c in chunks]
        assert streamed == getattr(choice.logprobs, name), name


async def test_prompt_logprobs_are_vllms_per_position_tables() -> None:
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    async with serving() as (engine, client):
        reference = await engine.generate(PROMPT, params)
        done = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=2,
            temperature=0.0,
            extra_body={"prompt_logprobs": 1},
        )
    rows = done.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert reference.prompt_logprobs is not None and reference.prompt_top_logprobs is not None
    assert rows[0] is None and len(rows) == len(reference.prompt_token_ids)
    for row, token, logprob, top in zip(
        rows[1:],
        reference.prompt_token_ids[1:],
        reference.prompt_logprobs[1:],
        reference.prompt_top_logprobs[1:],
        strict=True,
    ):
        assert row[str(token)]["logprob"] == pytest.approx(logprob)
        assert top is not None and row[str(top[0].token_id)]["logprob"] == pytest.approx(
            top[0].logprob
        )
        assert set(row) == {str(token), str(top[0].token_id)}


async def test_a_stream_the_engine_ends_says_why_before_done() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    _, http = openai_client(engine)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
    body["ignore_eos"] = True
    async with http, anyio.create_task_group() as group:
        responses: list[httpx2.Response] = []

        async def post() -> None:
            responses.append(await http.post("/v1/completions", json=body))

        group.start_soon(post)
        while engine.stats().iterations < 3:
            await anyio.sleep(0.005)
        await engine.stop()
    lines = [line for line in responses[0].text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["code"] == 503 and "closed" in error["message"]


async def test_a_streamed_completion_adds_up_to_the_unstreamed_one() -> None:
    async with serving() as (engine, client):
        body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12}
        body["temperature"] = 0.0
        whole = await client.completions.create(**body, stop=["e"])
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                **body, stop=["e"], stream=True, stream_options={"include_usage": True}
            )
        ]
        await _idle(engine)
    *tokens, last = chunks
    assert "".join(c.choices[0].text for c in tokens) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in tokens][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in tokens[:-1])
    assert last.choices == [] and last.usage == whole.usage
    assert tokens[-1].choices[0].model_extra["metrics"]["e2e"] > 0  # type: ignore[index]


async def test_chat_renders_the_models_template_streamed_or_not() -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    async with serving() as (engine, client):
        ids = engine.tokenizer.apply_chat_template(MESSAGES)
        reference = await engine.generate(ids, params)
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0.0}
        body["extra_body"] = {"ignore_eos": True}
        done = await client.chat.completions.create(
            **body, max_completion_tokens=8, logprobs=True, top_logprobs=1
        )
        stream = await client.chat.completions.create(**body, max_tokens=8, stream=True)
        chunks = [chunk async for chunk in stream]
    (choice,) = done.choices
    assert choice.message.role == "assistant" and choice.message.content == reference.text
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(reference.logprobs)
    for entry in choice.logprobs.content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_n_and_several_prompts_are_choices_in_openais_order() -> None:
    greedy_params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    async with serving() as (engine, client):
        greedy = await client.completions.create(
            model=MODEL,
            prompt=["one two", "three"],
            n=2,
            max_tokens=6,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        alone = [(await engine.generate(p, greedy_params)).text for p in ("one two", "three")]
        prompt_tokens = len(engine.tokenize("one two")) + len(engine.tokenize("three"))
        # Seeded: sample j of a prompt takes seed + j, so the samples differ and repeat.
        body: dict[str, Any] = {"model": MODEL, "prompt": "one", "max_tokens": 12, "seed": 3}
        body["extra_body"] = {"ignore_eos": True}
        sampled = await client.completions.create(**body, n=3, temperature=1.5)
        again = await client.completions.create(**body, n=3, temperature=1.5)
        third = await engine.generate(
            "one", SamplingParams(max_tokens=12, temperature=1.5, seed=5, ignore_eos=True)
        )
        await _idle(engine)
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    assert [c.text for c in greedy.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert greedy.usage is not None  # each prompt counts once, however many choices it has
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (prompt_tokens, 24)
    texts = [c.text for c in sampled.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) == 3
    assert texts[2] == third.text


async def test_response_format_and_structured_outputs_constrain_the_output() -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    async with serving() as (_, client):
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60}
        body["temperature"] = 0.7
        body["seed"] = 1
        done = await client.chat.completions.create(
            **body,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            extra_body={"structured_outputs": None},
        )
        regex = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=20,
            extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
        )
    value = json.loads(done.choices[0].message.content or "")
    assert set(value) == {"ok", "n"} and isinstance(value["n"], int)
    assert done.choices[0].finish_reason == "stop"
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"


BAD_COMPLETIONS = [
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [1, 10**9]}, 400, "outside the vocabulary"),
    ({"prompt": [[5, 6], [1, 10**9]]}, 400, "outside the vocabulary"),
    ({"prompt": ["fine", [5, 6]]}, 400, "prompt"),  # OpenAI's prompts are all text or all ids
    ({"prompt": "x " * 5000}, 400, "context"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"deadline": -1}, 400, "deadline"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"echo": True}, 400, "echo"),
    ({"best_of": 3}, 400, "best_of"),
    ({"n": 17}, 400, "choices"),
    ({"n": 0}, 400, "n must be"),
    ({"stop": 5}, 400, "stop"),
    ({"logit_bias": {"99999999": 1}}, 400, "vocabulary"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"structured_outputs": {"regex": "("}}, 400, "does not compile"),
]


@pytest.mark.parametrize(("change", "status", "message"), BAD_COMPLETIONS)
async def test_a_bad_completion_is_refused_in_openais_shape_and_queues_nothing(
    change: dict[str, Any], status: int, message: str
) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **change}
    async with serving(max_model_len=4096) as (engine, client):
        response = await client._client.post("http://medha/v1/completions", json=body)
        assert response.status_code == status
        error = response.json()["error"]
        assert message in error["message"] and error["code"] == status
        assert error["type"] == "invalid_request_error"
        stats = engine.stats()
        assert (stats.iterations, stats.waiting, stats.running) == (0, 0, 0)


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "role"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    (
        {
            "response_format": {"type": "json_object"},
            "extra_body": {"structured_outputs": {"regex": "a"}},
        },
        "either response_format or structured_outputs",
    ),
    ({"n": 2, "stream": False, "max_completion_tokens": -3}, "max_tokens"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CHATS)
async def test_a_bad_chat_is_a_400_while_another_request_streams_on(
    change: dict[str, Any], message: str
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, **change}
    async with serving() as (engine, client):
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        alone = await engine.generate(PROMPT, params)
        async with anyio.create_task_group() as group:
            streamed: list[str] = []

            async def stream() -> None:
                async for event in engine.stream(PROMPT, params):
                    streamed.append(event.text)

            group.start_soon(stream)
            while not streamed:
                await anyio.sleep(0.005)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(**body)
        assert message in str(refused.value)
        assert "".join(streamed) == alone.text
        await _idle(engine)


async def test_deadline_x_request_id_and_unknown_fields() -> None:
    async with serving() as (engine, client):
        done = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=3,
            user="someone",  # OpenAI's field, of no use to medha: ignored
            extra_body={"deadline": 30.0, "no_such_field": 1},
            extra_headers={"X-Request-Id": "mine"},
        )
        assert done.id == "mine"
        metrics = done.choices[0].model_extra["metrics"]  # type: ignore[index]
        assert metrics["deadline"] == 30.0 and metrics["deadline_met"] is True
        # The id is free again once its request ended; while one runs, it is taken.
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: client.completions.create(
                    prompt=PROMPT,
                    max_tokens=200,
                    extra_body={"ignore_eos": True},
                    extra_headers={"X-Request-Id": "mine"},
                    model=MODEL,
                )
            )
            while engine.stats().running == 0:
                await anyio.sleep(0.005)
            with pytest.raises(openai.BadRequestError, match="already in use"):
                await client.completions.create(
                    model=MODEL, prompt=PROMPT, extra_headers={"X-Request-Id": "mine"}
                )
            assert engine.stats().running == 1


async def test_health_models_and_stats() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    client, http = openai_client(engine)
    async with http:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert models.data[0].model_extra["max_model_len"] == engine.max_model_len  # type: ignore[index]
        assert (await http.get("/health")).json() == {"status": "ok"}
        await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        stats = (await http.get("/stats")).json()
        assert stats["total_blocks"] == engine.stats().total_blocks and stats["finished"] == 1
        await engine.stop()
        assert (await http.get("/health")).status_code == 503
        with pytest.raises(openai.APIStatusError) as closed:
            await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert closed.value.status_code == 503
