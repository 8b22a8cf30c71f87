"""vLLM's `skip_special_tokens` and `return_tokens_as_token_ids` over the API: special tokens'
text in a choice's text, and logprobs that name each token `token_id:ID` (the sampled ids
exactly, as RL trainers need them), per request or as the server's default."""

from __future__ import annotations

from typing import Any

import pytest

import medha
from medha import SamplingParams
from tests.engine_support import MODEL, engine_config
from tests.server_support import MESSAGES, PROMPT, openai_client, serving

pytestmark = pytest.mark.anyio

IM_START, WORD = 2, 88
"""tiny-random's `<|im_start|>` (a special token) and an ordinary token."""

MIXED: dict[str, Any] = {"allowed_token_ids": [IM_START, WORD], "ignore_eos": True}
"""Samples (with a seed) of a special token and an ordinary one."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _ids(names: list[str]) -> list[int]:
    assert all(name.startswith("token_id:") for name in names), names
    return [int(name.removeprefix("token_id:")) for name in names]


async def test_skip_special_tokens_false_shows_special_tokens_in_completions() -> None:
    params = SamplingParams(max_tokens=12, seed=5, skip_special_tokens=False, **MIXED)
    sampled = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "seed": 5}
    async with serving() as (engine, client):
        reference = await engine.generate(PROMPT, params)
        shown = await client.completions.create(
            **sampled, extra_body={**MIXED, "skip_special_tokens": False}
        )
        skipped = await client.completions.create(**sampled, extra_body=MIXED)
        stream = await client.completions.create(
            **sampled, stream=True, extra_body={**MIXED, "skip_special_tokens": False}
        )
        streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert IM_START in reference.token_ids and "<|im_start|>" in reference.text
    assert shown.choices[0].text == reference.text == streamed
    assert skipped.choices[0].text == reference.text.replace("<|im_start|>", "")


async def test_chat_logprobs_name_the_sampled_ids_and_special_tokens_can_be_shown() -> None:
    chat: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 10}
    chat.update(seed=5, logprobs=True, top_logprobs=2)
    as_ids = {**MIXED, "skip_special_tokens": False, "return_tokens_as_token_ids": True}
    async with serving() as (engine, client):
        named = await client.chat.completions.create(**chat, extra_body=as_ids)
        texts = await client.chat.completions.create(**chat, extra_body=MIXED)
        decode = engine.tokenizer.decode
    assert named.choices[0].logprobs is not None and texts.choices[0].logprobs is not None
    content = named.choices[0].logprobs.content or []
    ids = _ids([entry.token for entry in content])
    assert IM_START in ids
    assert named.choices[0].message.content == decode(ids, skip_special_tokens=False)
    assert texts.choices[0].message.content == decode(ids, skip_special_tokens=True)
    text_content = texts.choices[0].logprobs.content or []
    for entry, text_entry, token in zip(content, text_content, ids, strict=True):
        # `bytes` stays the token's text either way; only its name changes.
        assert text_entry.token == decode([token], skip_special_tokens=False)
        assert entry.bytes == text_entry.bytes == list(text_entry.token.encode())
        assert entry.logprob == pytest.approx(text_entry.logprob)
        assert len(_ids([top.token for top in entry.top_logprobs])) == 2


async def test_completion_logprobs_named_by_id_tell_apart_tokens_of_the_same_text() -> None:
    request: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6}
    request.update(temperature=0.0, logprobs=5, echo=True)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    async with serving() as (engine, client):
        reference = await engine.generate(PROMPT, greedy)
        named = await client.completions.create(
            **request, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}
        )
        texts = await client.completions.create(**request, extra_body={"ignore_eos": True})
        decode = engine.tokenizer.decode
    table, text_table = named.choices[0].logprobs, texts.choices[0].logprobs
    assert table is not None and text_table is not None
    assert table.top_logprobs is not None and text_table.top_logprobs is not None
    assert named.choices[0].text == texts.choices[0].text == PROMPT + reference.text
    # The echoed prompt's tokens and the output's, each named by its id.
    assert _ids(table.tokens or []) == [*reference.prompt_token_ids, *reference.token_ids]
    assert table.text_offset == text_table.text_offset  # where each token's text starts
    assert table.token_logprobs == text_table.token_logprobs
    assert table.top_logprobs[0] is None  # the first prompt token: nothing predicts it
    for row, text_row in zip(table.top_logprobs[1:], text_table.top_logprobs[1:], strict=True):
        assert row is not None and text_row is not None
        by_text: dict[str, float] = {}
        for token, logprob in sorted(row.items(), key=lambda item: -item[1]):
            by_text.setdefault(decode(_ids([token]), skip_special_tokens=False), logprob)
        assert by_text == text_row  # the text-keyed table keeps each text's most likely
        assert len(row) in (5, 6)  # the 5 most likely and the sampled one
    # Byte tokens of the random model's choices decode to U+FFFD alike: by id, none merge.
    assert sum(len(row or {}) for row in table.top_logprobs) > sum(
        len(row or {}) for row in text_table.top_logprobs
    )


async def test_the_servers_default_names_tokens_by_id_unless_a_request_says_not() -> None:
    request: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
    request.update(temperature=0.0, logprobs=1)
    async with medha.Engine(engine_config()) as engine:
        client, http = openai_client(engine, return_tokens_as_token_ids=True)
        async with http:
            named = await client.completions.create(**request)
            texts = await client.completions.create(
                **request, extra_body={"return_tokens_as_token_ids": False}
            )
            stream = await client.completions.create(**request, stream=True)
            streamed = [
                token
                async for chunk in stream
                if chunk.choices and chunk.choices[0].logprobs
                for token in chunk.choices[0].logprobs.tokens or []
            ]
        decode = engine.tokenizer.decode
    assert named.choices[0].logprobs is not None and texts.choices[0].logprobs is not None
    tokens = named.choices[0].logprobs.tokens
    assert tokens is not None and streamed == tokens
    text_tokens = texts.choices[0].logprobs.tokens
    assert text_tokens == [decode([t], skip_special_tokens=False) for t in _ids(tokens)]
