"""`echo` on /v1/completions: each choice's text starts with its prompt, and its logprobs
table with the prompt's tokens as the model scores them (the engine's prompt logprobs); with
`max_tokens: 0`, only the prompt. What evaluation harnesses send to score a text
(lm-evaluation-harness's `local-completions`), streamed or not."""

from __future__ import annotations

from typing import Any

import pytest

from medha import SamplingParams
from medha.request import TokenEvent
from medha.server.echo import without_output
from tests.engine_support import MODEL
from tests.server_support import PROMPT, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _strings(engine: Any, ids: list[int]) -> list[str]:
    return [engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]


async def test_echo_prepends_the_prompt_and_its_scored_tokens() -> None:
    params = SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    async with serving() as (engine, client):
        reference = await engine.generate(PROMPT, params)
        greedy: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
        greedy.update(temperature=0.0, logprobs=2, extra_body={"ignore_eos": True})
        done = await client.completions.create(**greedy, echo=True)
        plain = (await client.completions.create(**greedy)).choices[0]  # the same, no echo
        fewer = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=1,
            logprobs=2,
            echo=True,
            extra_body={"prompt_logprobs": 1},
        )
    # prompt_logprobs asked for shows its one alternative (and the token's own), though the
    # echoed table's two were computed.
    asked = (fewer.choices[0].model_extra or {})["prompt_logprobs"]
    assert asked[0] is None and {len(row) for row in asked[1:]} <= {1, 2}
    assert max(len(row) for row in asked[1:]) == 2
    fewer_table = fewer.choices[0].logprobs
    assert fewer_table is not None and fewer_table.top_logprobs is not None
    assert max(len(top or ()) for top in fewer_table.top_logprobs) == 3
    (choice,) = done.choices
    prompt_ids = reference.prompt_token_ids
    assert engine.tokenizer.bos_token_id == prompt_ids[0]  # a special token: not in the text
    assert choice.text == PROMPT + reference.text
    assert done.usage is not None and done.usage.completion_tokens == 3
    table = choice.logprobs
    assert table is not None and table.token_logprobs is not None and table.top_logprobs
    assert reference.prompt_logprobs is not None and reference.logprobs is not None
    assert table.tokens == _strings(engine, [*prompt_ids, *reference.token_ids])
    expected = [*reference.prompt_logprobs, *reference.logprobs]
    assert table.token_logprobs[0] is None and table.top_logprobs[0] is None
    assert table.token_logprobs[1:] == pytest.approx(expected[1:])
    # Each prompt token's text is where its offset says; the output's offsets are as without
    # echo, after the prompt.
    assert table.text_offset is not None and plain.logprobs is not None
    prompt_offsets = table.text_offset[: len(prompt_ids)]
    assert prompt_offsets[:2] == [0, 0]  # the BOS has no text
    for token, offset in zip(table.tokens[1 : len(prompt_ids)], prompt_offsets[1:], strict=True):
        assert choice.text[offset : offset + len(token)] == token
    output_offsets = [len(PROMPT) + offset for offset in plain.logprobs.text_offset or ()]
    assert table.text_offset[len(prompt_ids) :] == output_offsets
    # The prompt's alternatives are the two most likely and its own token, as the output's.
    assert reference.prompt_top_logprobs is not None
    for position in range(1, len(prompt_ids)):
        top = table.top_logprobs[position]
        alternatives = reference.prompt_top_logprobs[position]
        assert top is not None and alternatives is not None
        texts = set(_strings(engine, [a.token_id for a in alternatives]))
        assert set(top) == texts | {table.tokens[position]}
        assert max(top.values()) == pytest.approx(alternatives[0].logprob)
    assert choice.model_extra is not None and choice.model_extra["prompt_logprobs"] is None


async def test_max_tokens_zero_scores_token_prompts_as_lm_eval_asks() -> None:
    prompts = [[5, 17, 42, 8, 99], [7, 7, 300, 12]]
    async with serving() as (engine, client):
        scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        references = [await engine.generate(p, scored) for p in prompts]
        done = await client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=0, temperature=0.0, logprobs=1, echo=True
        )
        # lm-evaluation-harness's loglikelihood request: one token more, read up to it.
        harness = await client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=1, temperature=0.0, logprobs=1, echo=True
        )
        assert engine.stats().running == 0
    assert done.usage is not None and done.usage.completion_tokens == 0
    for choice, prompt, reference, extended in zip(
        done.choices, prompts, references, harness.choices, strict=True
    ):
        assert choice.finish_reason == "length"
        assert choice.text == engine.tokenizer.decode(prompt, skip_special_tokens=False)
        table = choice.logprobs
        assert table is not None and table.token_logprobs is not None
        assert table.tokens == _strings(engine, prompt)
        assert reference.prompt_logprobs is not None
        assert table.token_logprobs[0] is None
        assert table.token_logprobs[1:] == pytest.approx(list(reference.prompt_logprobs[1:]))
        # The harness's reading: the continuation's logprobs, and whether each is the top one.
        assert extended.logprobs is not None and extended.logprobs.token_logprobs is not None
        assert extended.logprobs.top_logprobs is not None
        context = 2
        continuation = extended.logprobs.token_logprobs[context:-1]
        assert continuation == pytest.approx(table.token_logprobs[context:])
        greedy = [
            logprob == max(top.values())
            for logprob, top in zip(
                continuation, extended.logprobs.top_logprobs[context:-1], strict=True
            )
        ]
        top_ids = [a[0].token_id for a in (reference.prompt_top_logprobs or ())[context:] if a]
        assert greedy == [t == p for t, p in zip(top_ids, prompt[context:], strict=True)]
        # A character the prompt leaves unfinished is the output's to finish, shown once.
        whole = engine.tokenizer.decode([*prompt, *reference.token_ids], skip_special_tokens=False)
        assert extended.text == whole


async def test_a_text_prompt_is_echoed_as_sent_special_tokens_and_all() -> None:
    chat = "<|im_start|>user\nHi, café<|im_end|>\n<|im_start|>assistant\n"
    async with serving() as (engine, client):
        done = await client.completions.create(
            model=MODEL,
            prompt=chat,
            max_tokens=0,
            echo=True,
            logprobs=0,
            extra_body={"add_special_tokens": False},
        )
        ids = engine.tokenizer.encode(chat, add_special_tokens=False)
        # Truncated by the engine: the tokens it kept, decoded, special tokens and all.
        marker = engine.tokenizer.encode("<|im_start|>", add_special_tokens=False)
        keep = len(ids) - max(i for i, token in enumerate(ids) if [token] == marker)
        kept = await client.completions.create(
            model=MODEL,
            prompt=chat,
            max_tokens=0,
            echo=True,
            extra_body={"add_special_tokens": False, "truncate_prompt_tokens": keep},
        )
    (choice,) = done.choices
    assert choice.text == chat
    table = choice.logprobs
    assert table is not None and table.text_offset is not None and table.tokens is not None
    assert table.tokens == _strings(engine, ids)
    assert any(token == "<|im_start|>" for token in table.tokens)
    for token, offset in zip(table.tokens, table.text_offset, strict=True):
        if token != "\ufffd":  # a byte of "é" alone
            assert chat[offset : offset + len(token)] == token
    assert kept.choices[0].text == engine.tokenizer.decode(ids[-keep:], skip_special_tokens=False)
    assert kept.choices[0].text.startswith("<|im_start|>")


def _added_up(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Each choice's text and logprobs table, as a client adds up a stream's chunks."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for piece in chunk.choices:
            whole = choices.setdefault(piece.index, {"text": "", "rows": []})
            whole["text"] += piece.text
            if piece.logprobs is not None:
                table = piece.logprobs
                whole["rows"] += list(
                    zip(
                        table.tokens,
                        table.token_logprobs,
                        table.top_logprobs,
                        table.text_offset,
                        strict=True,
                    )
                )
    return choices


async def test_a_streamed_echo_adds_up_to_the_whole_one() -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": [PROMPT, "Hello there, general"],
        "n": 2,
        "max_tokens": 4,
        "temperature": 0.8,
        "seed": 3,
        "logprobs": 1,
        "echo": True,
        "extra_body": {"prompt_logprobs": 3, "ignore_eos": True},
    }
    async with serving() as (_, client):
        done = await client.completions.create(**body)
        chunks = [chunk async for chunk in await client.completions.create(**body, stream=True)]
    streamed = _added_up(chunks)
    for choice in done.choices:
        assert choice.text.startswith(body["prompt"][choice.index // 2])
        assert streamed[choice.index]["text"] == choice.text
        table = choice.logprobs
        assert table is not None
        rows = zip(
            table.tokens, table.token_logprobs, table.top_logprobs, table.text_offset, strict=True
        )
        assert streamed[choice.index]["rows"] == list(rows)
        # The echoed table names one alternative; prompt_logprobs, asked for, its three.
        assert table.top_logprobs is not None
        assert all(top is None or len(top) <= 2 for top in table.top_logprobs)
        rows_asked = (choice.model_extra or {})["prompt_logprobs"]
        assert rows_asked[0] is None
        assert any(len(row) == 4 for row in rows_asked[1:])  # three and the prompt's own token


def test_a_prompt_only_choice_shows_no_token_and_ends_by_length_unless_aborted() -> None:
    sampled = TokenEvent("r", 5, "x", finish_reason="stop", logprob=-0.5, prompt_logprobs=(None,))
    shown = without_output(sampled)
    assert (shown.token_id, shown.text, shown.logprob, shown.finish_reason) == (
        None,
        "",
        None,
        "length",
    )
    assert shown.prompt_logprobs == (None,)  # the prompt's scores stay
    assert without_output(TokenEvent("r", 5, "x")).finish_reason is None
    assert without_output(TokenEvent("r", None, "", finish_reason="abort")).finish_reason == "abort"
