"""POST /tokenize and /detokenize (vLLM's): the ids the completions endpoints run for a prompt or
a chat, their text back, typed errors, the API key, and long texts off the event loop."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest

import medha
from medha.server import create_app
from tests.engine_support import MODEL, HeldEncode, engine_config, idle, long_from
from tests.server_support import MESSAGES, PROMPT, openai_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[tuple[medha.Engine, Any, Any]]:
    """An engine, OpenAI's client of its app, and the HTTP client under it."""
    async with medha.Engine(engine_config(**config)) as engine:
        client, http = openai_client(engine)
        async with http:
            yield engine, client, http


async def _post(http: Any, path: str, **body: Any) -> Any:
    # json.dumps escapes a lone surrogate ("\\ud800"), which a client's encoder refuses to send.
    headers = {"Content-Type": "application/json"}
    return await http.post(path, content=json.dumps(body), headers=headers)


async def test_a_prompts_tokens_are_the_ones_a_completion_runs() -> None:
    async with serving() as (engine, client, http):
        answer = (await _post(http, "/tokenize", prompt=PROMPT, model=MODEL)).json()
        ids = engine.tokenize(PROMPT)
        # An empty model name is the served model, as in vLLM (and on every endpoint).
        assert (await _post(http, "/tokenize", prompt=PROMPT, model="")).json() == answer
        done = await client.completions.create(model="", prompt=PROMPT, max_tokens=1)
        assert done.model == MODEL
        assert answer == {
            "count": len(ids),
            "max_model_len": engine.max_model_len,
            "tokens": ids,
            "token_strs": None,  # as vLLM: null unless asked for
        }
        plain = await _post(
            http, "/tokenize", prompt=PROMPT, add_special_tokens=False, return_token_strs=True
        )
        plain_ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
        assert plain_ids != ids  # the tokenizer's BOS is left out
        assert plain.json()["tokens"] == plain_ids
        pieces = engine.tokenizer.hf_tokenizer.convert_ids_to_tokens(plain_ids)
        assert plain.json()["token_strs"] == pieces
        # /v1/completions runs those ids, with or without the special tokens (vLLM's field).
        for special, expected in [(True, ids), (False, plain_ids), (None, ids)]:
            completion = await client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=1,
                extra_body={"add_special_tokens": special, "prompt_logprobs": 0},
            )
            assert completion.usage.prompt_tokens == len(expected)
            scored = completion.choices[0].model_extra["prompt_logprobs"]
            assert [int(next(iter(row))) for row in scored[1:]] == expected[1:]


async def test_a_chats_tokens_are_the_ones_a_chat_completion_runs() -> None:
    async with serving() as (engine, client, http):
        answer = (await _post(http, "/tokenize", messages=MESSAGES)).json()
        assert answer["tokens"] == engine.tokenizer.apply_chat_template(MESSAGES)
        chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        assert chat.usage.prompt_tokens == answer["count"] == len(answer["tokens"])
        no_turn = await _post(http, "/tokenize", messages=MESSAGES, add_generation_prompt=False)
        expected = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
        assert no_turn.json()["tokens"] == expected != answer["tokens"]


async def test_detokenize_gives_the_text_of_ids_special_tokens_included() -> None:
    async with serving() as (engine, _client, http):
        ids = (await _post(http, "/tokenize", messages=MESSAGES)).json()["tokens"]
        text = (await _post(http, "/detokenize", tokens=ids, model=MODEL)).json()["prompt"]
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=False)
        assert text != engine.tokenizer.decode(ids)  # the template's special tokens are there
        assert (await _post(http, "/detokenize", tokens=[])).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400, "one of them"),
        ("/tokenize", {}, 400, "one of them"),
        ("/tokenize", {"prompt": ""}, 400, "empty"),
        ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400, "chat template"),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ 'X' }}"}, 400, "chat_template"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "one of them"),
        ("/tokenize", {"prompt": PROMPT, "continue_final_message": True}, 400, "with `messages`"),
        ("/tokenize", {"prompt": PROMPT, "chat_template_kwargs": {"a": 1}}, 400, "`messages`"),
        (
            "/tokenize",
            {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": False}},
            400,
            "may not set tokenize",
        ),
        ("/tokenize", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
        ("/tokenize", {"prompt": "a\ud800b", "add_special_tokens": False}, 400, "UTF-8"),
        ("/v1/completions", {"prompt": "a\ud800b", "add_special_tokens": False}, 400, "UTF-8"),
        ("/v1/chat/completions", {"messages": MESSAGES, "add_special_tokens": True}, 400, "chat"),
        ("/tokenize", {"prompt": PROMPT, "model": "other"}, 404, "`other` does not exist"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "vocabulary"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "`other` does not exist"),
    ],
)
async def test_bad_bodies_are_typed_errors_and_harm_nothing(
    path: str, body: dict[str, Any], status: int, says: str
) -> None:
    async with serving() as (engine, _client, http):
        response = await _post(http, path, **body)
        assert response.status_code == status
        assert says in response.json()["error"]["message"]
        assert (await _post(http, "/tokenize", prompt=PROMPT)).status_code == 200
        await idle(engine)


async def test_tokenize_needs_the_api_key() -> None:
    async with serving() as (engine, _, _http):
        app = create_app(engine, api_key="s3cret")
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
            for path, body in [("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})]:
                assert (await http.post(path, json=body)).status_code == 401
                key = {"Authorization": "Bearer s3cret"}
                assert (await http.post(path, json=body, headers=key)).status_code == 200


async def test_tokenizer_info_is_what_a_remote_tokenizer_needs() -> None:
    # lm-evaluation-harness's remote tokenizer: the eos token's text from /tokenizer_info,
    # its id from /tokenize, the chat template to render chats itself.
    async with serving() as (engine, _, plain):
        assert (await plain.get("/tokenizer_info")).status_code == 404  # off by default
        app = create_app(engine, api_key="s3cret", enable_tokenizer_info=True)
        transport = httpx2.ASGITransport(app=app)
        key = {"Authorization": "Bearer s3cret"}
        async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
            assert (await http.get("/tokenizer_info")).status_code == 401
            info = (await http.get("/tokenizer_info", headers=key)).json()
            eos = await http.post(
                "/tokenize",
                json={"prompt": info["eos_token"], "add_special_tokens": False},
                headers=key,
            )
    hf = engine.tokenizer.hf_tokenizer
    assert eos.json()["tokens"] == [hf.eos_token_id]
    assert info["bos_token"] == hf.bos_token and info["chat_template"] == hf.chat_template
    assert info["tokenizer_class"] == type(hf).__name__
    assert info["added_tokens_decoder"][str(hf.bos_token_id)] == hf.bos_token
    # Nothing of this machine's files.
    assert not {"name_or_path", "vocab_file", "is_local"} & set(info)
    assert str(engine.tokenizer.folder) not in json.dumps(info)


@pytest.mark.parametrize("special", [True, False], ids=["special tokens", "without"])
async def test_a_long_text_is_tokenized_off_the_loop_and_may_exceed_the_context(
    monkeypatch: pytest.MonkeyPatch, special: bool
) -> None:
    document = "A long document, sentence after sentence. " * 600  # ~5.4K tokens
    async with serving() as (engine, _client, http):
        body = {"prompt": document, "add_special_tokens": special}
        inline = (await _post(http, "/tokenize", **body)).json()
        long_from(monkeypatch, 1000)
        held = HeldEncode(engine, monkeypatch)
        answers: list[Any] = []

        async def send() -> None:
            answers.append((await _post(http, "/tokenize", **body)).json())

        await held.run_while_others_stream(engine, send)
        assert held.threads and threading.get_ident() not in held.threads
        assert answers[0] == inline
        assert inline["count"] > inline["max_model_len"] == 4096  # counted, not refused
        text = (await _post(http, "/detokenize", tokens=inline["tokens"])).json()["prompt"]
        assert text == engine.tokenizer.decode(inline["tokens"], skip_special_tokens=False)
        await idle(engine)


async def test_the_answer_is_written_at_once_not_walked_by_fastapis_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FastAPI's encoder walks a returned dict in Python, on the event loop: for a 900K-token
    document's ids, ~2 s in which nothing streams."""
    import fastapi.routing

    encode = fastapi.routing.jsonable_encoder
    walked: list[Any] = []

    def recording(value: Any, *args: Any, **kwargs: Any) -> Any:
        walked.append(value)
        return encode(value, *args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "jsonable_encoder", recording)
    async with serving() as (_, _client, http):
        answer = await _post(http, "/tokenize", prompt=PROMPT, return_token_strs=True)
        assert answer.status_code == 200 and answer.json()["count"] > 0
    assert not [value for value in walked if isinstance(value, dict) and "tokens" in value]
