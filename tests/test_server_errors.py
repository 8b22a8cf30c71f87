"""The OpenAI-compatible API's refusals and failures: every bad request is a 400 (404 for another
model) in OpenAI's error shape, queues nothing and disturbs no other request; a stream the
engine ends says why before [DONE]; a failure medha did not plan is a 500 of the same shape."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2
import openai
import pytest

import medha
from medha import SamplingParams
from medha.server import create_app
from tests.engine_support import MODEL, engine_config, idle
from tests.server_support import MESSAGES, PROMPT, openai_client, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
    ({"echo": True, "prompt": "x " * 5000}, 400, "context"),
    ({"echo": True, "max_tokens": -1}, 400, "max_tokens"),  # 0 only: the prompt alone
    ({"echo": True, "logprobs": 2, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ({"echo": True, "max_tokens": 0, "min_tokens": 2}, 400, "min_tokens must be 0"),
    ({"best_of": 3}, 400, "best_of"),
    ({"n": 17}, 400, "choices"),
    ({"n": 0}, 400, "n must be"),
    ({"stop": 5}, 400, "stop"),
    ({"logit_bias": {"99999999": 1}}, 400, "vocabulary"),
    ({"logit_bias": {"-1": 1}}, 400, "token ids must be >= 0, got -1"),
    ({"logit_bias": {"\u00b2": 1}}, 400, "token ids must be int"),  # "²".isdigit()
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"structured_outputs": {"regex": "("}}, 400, "does not compile"),
    ({"structured_outputs": {}}, 400, "got none"),  # as vLLM: not "unconstrained"
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
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "needs a tool-call parser"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    (
        {
            "response_format": {"type": "json_object"},
            "extra_body": {"structured_outputs": {"regex": "a"}},
        },
        "give one of response_format, structured_outputs",
    ),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "exactly one"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions is not supported"),
    ({"extra_body": {"chat_template": "{{ x }}"}}, "chat_template is not supported"),
    ({"extra_body": {"skip_special_tokens": "maybe"}}, "skip_special_tokens"),
    ({"extra_body": {"return_tokens_as_token_ids": [1]}}, "return_tokens_as_token_ids"),
    ({"extra_body": {"continue_final_message": True}}, "set one of them"),
    ({"extra_body": {"chat_template_kwargs": {"chat_template": "{{ 'X' }}"}}}, "may not set"),
    ({"extra_body": {"chat_template_kwargs": ["enable_thinking"]}}, "chat_template_kwargs"),
    ({"extra_body": {"echo": "loud"}}, "echo"),
    ({"extra_body": {"add_special_tokens": True}}, "add_special_tokens is not supported"),
    ({"n": 2, "stream": False, "max_completion_tokens": -3}, "max_tokens"),
    ({"extra_body": {"best_of": 2}}, "best_of is not supported"),
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
        await idle(engine)


async def test_a_stream_the_engine_ends_says_why_before_done() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    _, http = openai_client(engine)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
    # Greedy: the same tokens every run. A sampled token may add no text (bytes of a character
    # still unfinished), and a token without text sends no chunk.
    body.update(ignore_eos=True, temperature=0.0)
    async with http, anyio.create_task_group() as group:
        responses: list[httpx2.Response] = []

        async def post() -> None:
            responses.append(await http.post("/v1/completions", json=body))

        group.start_soon(post)
        while engine.stats().iterations < 10:
            await anyio.sleep(0.005)
        await engine.stop()
    lines = [line for line in responses[0].text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["code"] == 503 and "closed" in error["message"]


async def test_a_stream_of_several_choices_the_engine_ends_says_so_once() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    _, http = openai_client(engine)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "n": 3}
    async with http, anyio.create_task_group() as group:
        responses: list[httpx2.Response] = []

        async def post(stream: bool) -> None:
            responses.append(await http.post("/v1/completions", json={**body, "stream": stream}))

        group.start_soon(post, True)
        group.start_soon(post, False)
        while engine.stats().running < 6 or engine.stats().iterations < 3:
            await anyio.sleep(0.005)
        await engine.stop()  # every choice fails at once
    whole, streamed = sorted(responses, key=lambda r: r.headers["content-type"])
    assert whole.status_code == 503 and "closed" in whole.json()["error"]["message"]
    events = [line for line in streamed.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    errors = [e for e in events if e.startswith('data: {"error"')]
    assert len(errors) == 1 and json.loads(errors[0][len("data: ") :])["error"]["code"] == 503


async def test_a_grammar_violation_is_a_500_and_harms_no_other_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A mask that allows everything stands for a sampler bug (as in the engine's own test).
    import numpy as np

    from medha.grammar import GrammarMatcher

    monkeypatch.setattr(
        GrammarMatcher, "next_mask", lambda self: np.full(self._words, -1, dtype=np.int32)
    )
    async with serving() as (engine, client):
        free = engine.stream(PROMPT, SamplingParams(max_tokens=30, temperature=0.0))
        first = await free.__anext__()
        with pytest.raises(openai.InternalServerError, match="structured output"):
            await client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=8,
                temperature=0.0,
                extra_body={"structured_outputs": {"regex": "[0-9]{8}"}},
            )
        rest = [event async for event in free]
        alone = await engine.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0.0))
        await idle(engine)
    assert [e.token_id for e in [first, *rest]] == alone.token_ids


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("chat/completions", b'{"messages": [{"role": "user", "content": "caf\\udce9"}]}'),
        ("completions", b'{"prompt": "hi", "bad_words": ["caf\\udce9"]}'),
        (
            "chat/completions",
            b'{"messages": [{"role": "user", "name": "\\udce9", "content": "hi"}]}',
        ),
    ],
)
async def test_text_that_is_not_utf8_is_a_400(path: str, raw: bytes) -> None:
    # A lone surrogate is valid JSON ("\udce9") but no tokenizer can encode it.
    async with serving() as (engine, client):
        response = await client._client.post(
            f"http://medha/v1/{path}", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert "UTF-8" in response.json()["error"]["message"]
        assert engine.stats().iterations == 0


async def test_a_failure_medha_did_not_plan_is_a_500_in_openais_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving() as (engine, _):

        def broken(*args: Any, **kwargs: Any) -> list[int]:
            raise RuntimeError("a bug")

        monkeypatch.setattr(engine, "tokenize", broken)
        # Answered and logged, not raised again: a server would close the connection (a
        # keep-alive client's next request on it would fail), and this transport would raise.
        transport = httpx2.ASGITransport(app=create_app(engine))
        async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
            response = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert (await http.get("/health")).status_code == 200
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error (see the log)",
        "type": "server_error",
        "param": None,
        "code": 500,
    }


def test_logprobs_json_cannot_hold_has_its_floor() -> None:
    from medha.server.responses import chat_logprobs, completion_logprobs

    strings = lambda token_id: f"<{token_id}>"  # noqa: E731
    rows = [(5, float("-inf"), (medha.TokenLogprob(6, float("nan")),))]
    table = completion_logprobs(rows, [0], strings)  # type: ignore[arg-type]
    assert table["token_logprobs"] == [-9999.0]
    assert table["top_logprobs"] == [{"<6>": -9999.0, "<5>": -9999.0}]
    (entry,) = chat_logprobs(rows, strings)["content"]  # type: ignore[arg-type]
    assert entry["logprob"] == entry["top_logprobs"][0]["logprob"] == -9999.0
    json.dumps(table, allow_nan=False)


async def test_choices_refused_together_release_every_id() -> None:
    from medha.server.choices import start_choices

    params = SamplingParams(max_tokens=2, temperature=0.0)
    async with medha.Engine(engine_config()) as engine:
        with pytest.raises(medha.InvalidRequestError) as refused:
            await start_choices(engine, [[5, 6], [5, 10**9]], params, 2, None, "x")
        # While the error (and the frames of its traceback) lives, x-0 and x-1 are free.
        assert refused.value is not None
        done = await engine.generate([5, 6], params, request_id="x-0")
        assert done.finish_reason == "length" and engine.stats().iterations > 0


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/completions", b'{"prompt": "caf\xe9"}', 400),  # not UTF-8 (Latin-1)
        ("get", "/v1/no-such-thing", b"", 404),
        ("get", "/v1/completions", b"", 405),
    ],
)
async def test_starlettes_own_errors_are_in_openais_shape(
    method: str, path: str, body: bytes, status: int
) -> None:
    async with serving() as (_, client):
        response = await client._client.request(
            method,
            f"http://medha{path}",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"]


async def test_a_body_that_is_not_an_object_says_so() -> None:
    json_type = {"content-type": "application/json"}
    async with serving() as (_, client):
        for content in (b"", b"[1, 2]", b'"text"'):
            response = await client._client.post(
                "http://medha/v1/completions", content=content, headers=json_type
            )
            assert response.status_code == 400
            assert response.json()["error"]["message"].startswith("body: "), content
        broken = await client._client.post(
            "http://medha/v1/completions", content=b'{"prompt": x}', headers=json_type
        )
        message = broken.json()["error"]["message"]
        assert message == "body: not valid JSON (Expecting value at character 11)"


async def test_behind_a_root_path_the_key_guards_what_the_router_serves() -> None:
    # A proxy's root path is part of Starlette's path; the router strips it only where a "/"
    # follows (root "/v" is no prefix of "/v1/models"), and the key's check must do the same.
    async with medha.Engine(engine_config()) as engine:
        for root in ("/v", "/v1"):
            transport = httpx2.ASGITransport(app=create_app(engine, api_key="k"), root_path=root)
            async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
                served = 0
                for path in ("/v1/models", f"{root}/v1/models"):
                    keyed = await http.get(path, headers={"Authorization": "Bearer k"})
                    if keyed.status_code == 200:  # what the router serves needs the key
                        served += 1
                        assert (await http.get(path)).status_code == 401, (root, path)
                assert served, root


async def test_with_an_api_key_v1_needs_it_and_health_does_not() -> None:
    async with medha.Engine(engine_config()) as engine:
        transport = httpx2.ASGITransport(app=create_app(engine, api_key="s3cret"))
        async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:

            def client(key: str) -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(
                    api_key=key, base_url="http://medha/v1", http_client=http, max_retries=0
                )

            for wrong in ("nope", "s3cret-and-more", "S3CRET"):
                with pytest.raises(openai.AuthenticationError, match="API key"):
                    await client(wrong).completions.create(model=MODEL, prompt=PROMPT)
            assert (await http.get("/v1/models")).status_code == 401  # no header at all
            # The key is checked before the body is read: no key, no parsing (nor 400).
            not_json = await http.post("/v1/completions", content=b"{not json")
            assert not_json.status_code == 401 and "API key" in not_json.json()["error"]["message"]
            assert (await http.post("/tokenize", content=b"[")).status_code == 401
            done = await client("s3cret").completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"ignore_eos": True}
            )
            assert done.usage is not None and done.usage.completion_tokens == 2
            stream = await client("s3cret").chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=3,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            assert [c.choices[0].finish_reason async for c in stream][-1] == "length"
            with pytest.raises(openai.AuthenticationError):
                await client("nope").chat.completions.create(
                    model=MODEL, messages=MESSAGES, stream=True
                )
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
            assert engine.stats().finished == 2
