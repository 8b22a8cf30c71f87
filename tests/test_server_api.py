"""medha's OpenAI-compatible API (medha.server), spoken to by OpenAI's own Python client in
process (no socket): outputs equal the Engine's for the same prompt and parameters, streamed
and not; chat renders the model's template; n and several prompts are choices in OpenAI's order;
response_format constrains the output; /v1/models, /health, /stats and /metrics describe the
engine.
Refusals and failures: tests/test_server_errors.py."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import medha
from medha import SamplingParams
from medha.request import RequestMetrics
from medha.server.responses import ChoiceOutput, usage
from tests.engine_support import MODEL, engine_config, idle
from tests.server_support import MESSAGES, PROMPT, openai_client, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_skipped_special_tokens_take_no_room_in_text_offset() -> None:
    # The end-of-sequence token forced (and not stopping): its text is skipped, so the tokens
    # after it start where it would have.
    async with serving() as (engine, client):
        eos = engine.tokenizer.eos_token_ids[0]
        done = await client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=3,
            logprobs=0,
            logit_bias={str(eos): 100},
            extra_body={"ignore_eos": True},
        )
    (choice,) = done.choices
    assert choice.text == "" and choice.logprobs is not None
    assert choice.logprobs.text_offset == [0, 0, 0]


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
    # Where each token's text starts in the choice's text: after what the events before it
    # said, and after the texts of tokens before it whose text was held back (this prompt's
    # greedy output has a byte that comes out as U+FFFD with the next token's text).
    offsets, released, held = [], 0, 0
    for event, string in zip(events, strings, strict=True):
        offsets.append(released + held)
        released += len(event.text)
        held = 0 if event.text else held + len(string)
    assert choice.logprobs.text_offset == offsets
    assert any(not event.text for event in events[:-1])  # a held-back text is in the case
    assert choice.logprobs.top_logprobs is not None
    rows = zip(choice.logprobs.top_logprobs, reference.top_logprobs, strings, strict=True)
    for top, expected, sampled in rows:
        # The 2 most likely and the sampled token (as vLLM's), keyed by text: of tokens of one
        # text (U+FFFD), the most likely is kept.
        texts = {engine.tokenizer.decode([t.token_id], skip_special_tokens=False) for t in expected}
        assert set(top) == texts | {sampled}
        assert max(top.values()) == pytest.approx(expected[0].logprob)
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
        await idle(engine)
    *tokens, last = chunks
    assert whole.choices[0].finish_reason == "stop"  # the stop string: text was held back
    assert "".join(c.choices[0].text for c in tokens) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in tokens][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in tokens[:-1])
    assert last.choices == [] and last.usage == whole.usage
    assert tokens[-1].choices[0].model_extra["metrics"]["e2e"] > 0  # type: ignore[index]


async def test_continuous_usage_stats_count_each_choice_so_far_on_its_chunks() -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "n": 2}
    body.update(temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    options = {"include_usage": True, "continuous_usage_stats": True}
    async with serving() as (_, client):
        chunks = [
            c async for c in await client.chat.completions.create(**body, stream_options=options)
        ]
        alone = [  # continuous_usage_stats counts only with include_usage, as in vLLM
            c
            async for c in await client.chat.completions.create(
                **body, stream_options={"continuous_usage_stats": True}
            )
        ]
    *per_choice, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 10
    counted: dict[int, int] = {}
    for chunk in per_choice:
        (choice,) = chunk.choices
        assert chunk.usage is not None and chunk.usage.prompt_tokens == last.usage.prompt_tokens
        counted[choice.index] = chunk.usage.completion_tokens
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + counted[choice.index]
    assert counted == {0: 5, 1: 5}
    assert [chunk.usage for chunk in per_choice[:2]] == [per_choice[0].usage] * 2  # the roles'
    assert per_choice[0].usage.completion_tokens == 0  # type: ignore[union-attr]
    assert all(chunk.usage is None for chunk in alone)
    # Completions' choices too, each with its own prompt's tokens.
    async with serving() as (engine, client):
        prompts = ["one two three", "four"]
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompts,
            max_tokens=3,
            stream=True,
            stream_options=options,  # type: ignore[arg-type]  # vLLM's field
            extra_body={"ignore_eos": True},
        )
        counts = {
            c.choices[0].index: c.usage for c in [chunk async for chunk in stream] if c.choices
        }
        lengths = [len(engine.tokenize(p)) for p in prompts]
    for index, length in enumerate(lengths):
        assert counts[index] is not None
        assert (counts[index].prompt_tokens, counts[index].completion_tokens) == (length, 3)


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
        await idle(engine)
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
        # A gateway may reuse one id for calls that overlap: each is its own request.
        async with anyio.create_task_group() as group:
            results: list[Any] = []

            async def call(tokens: int) -> None:
                results.append(
                    await client.completions.create(
                        model=MODEL,
                        prompt=PROMPT,
                        max_tokens=tokens,
                        extra_body={"ignore_eos": True},
                        extra_headers={"X-Request-Id": "mine"},
                    )
                )

            group.start_soon(call, 200)
            while engine.stats().running == 0:
                await anyio.sleep(0.005)
            await call(3)
            assert engine.stats().running == 1
    assert [r.id for r in results] == ["mine", "mine"]
    assert sorted(r.usage.completion_tokens for r in results) == [3, 200]


async def test_null_means_the_default_and_vllms_guided_fields_work() -> None:
    async with serving() as (engine, client):
        body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6}
        nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "top_k": None}
        done = await client.completions.create(**body, seed=4, extra_body=nulls)
        same = await engine.generate(PROMPT, SamplingParams(max_tokens=6, seed=4))
        assert done.choices[0].text == same.text  # temperature 1.0, top_p 1.0, n 1
        choice = await client.completions.create(
            **body,
            # "text" constrains nothing: it may come beside guided_choice
            extra_body={"guided_choice": ["yes", "no"], "response_format": {"type": "text"}},
        )
        chat = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": None},  # type: ignore[typeddict-item]
            extra_body={"add_generation_prompt": None},
        )
        assert [c.usage for c in [c async for c in chat]][-1] is None  # no usage chunk
        regex = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, extra_body={"guided_regex": "[a-c]{4}"}
        )
    assert choice.choices[0].text in ("yes", "no")
    assert re.fullmatch("[a-c]{4}", regex.choices[0].message.content or "")


async def test_streamed_chat_choices_logprobs_and_usage_add_up() -> None:
    async with serving() as (engine, client):
        body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10}
        body.update(n=2, seed=7, temperature=1.0, logprobs=True, top_logprobs=2)
        body["extra_body"] = {"prompt_logprobs": 1}
        whole = await client.chat.completions.create(**body)
        stream = await client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        await idle(engine)
    *deltas, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert [c.choices[0].delta.role for c in deltas[:2]] == ["assistant", "assistant"]
    for index, expected in enumerate(whole.choices):
        mine = [c.choices[0] for c in deltas[2:] if c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == expected.message.content
        content = [entry for c in mine if c.logprobs for entry in c.logprobs.content or ()]
        assert expected.logprobs is not None and content == expected.logprobs.content
        assert mine[-1].finish_reason == expected.finish_reason
        # The prompt's logprobs come on a choice's first chunk; whole, beside the choices.
        assert "prompt_logprobs" not in (expected.model_extra or {})
        prompt_rows = [c.model_extra.get("prompt_logprobs") for c in mine]
        assert prompt_rows[0] == (whole.model_extra or {})["prompt_logprobs"] is not None
        assert prompt_rows[1:] == [None] * (len(mine) - 1)


async def test_chat_template_kwargs_and_continue_final_message_shape_the_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_tokenizer import THINKING

    answer = [*MESSAGES, {"role": "assistant", "content": "My name"}]
    shape: dict[str, Any] = {
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    async with serving() as (engine, client):
        monkeypatch.setattr(engine.tokenizer.hf_tokenizer, "chat_template", THINKING)
        ids = engine.tokenizer.apply_chat_template(
            answer,
            False,
            continue_final_message=True,
            chat_template_kwargs={"enable_thinking": False},
        )
        greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        reference = await engine.generate(ids, greedy)
        done = await client.chat.completions.create(
            model=MODEL,
            messages=answer,  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0.0,
            extra_body={"ignore_eos": True, **shape},
        )
        tokenized = await client._client.post(
            "http://medha/tokenize", json={"messages": answer, **shape}
        )
    assert engine.tokenizer.decode(ids) == "/no_think Be brief.Hello?My name"
    assert done.choices[0].message.content == reference.text
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert tokenized.json()["tokens"] == ids


async def test_health_models_and_stats() -> None:
    engine = medha.Engine(engine_config())
    await engine.start()
    client, http = openai_client(engine)
    async with http:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert models.data[0].model_extra["max_model_len"] == engine.max_model_len  # type: ignore[index]
        assert (await http.get("/health")).json() == {"status": "ok"}
        for ping in (http.get, http.post):
            assert (await ping("/ping")).json() == {"status": "ok"}
        assert (await http.get("/version")).json() == {"version": medha.__version__}
        await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        stats = (await http.get("/stats")).json()
        assert stats["total_blocks"] == engine.stats().total_blocks and stats["finished"] == 1
        # Whatever a scraper asks for (this is Prometheus 2's Accept), Prometheus's text format.
        prometheus = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        metrics = await http.get("/metrics", headers={"Accept": prometheus})
        assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {
            (sample.name, sample.labels.get("finished_reason")): sample.value
            for family in text_string_to_metric_families(metrics.text)
            for sample in family.samples
            if sample.labels.get("model_name") == MODEL
        }
        ended = [samples["medha:request_success_total", r] for r in ("stop", "length")]
        assert sum(ended) == 1 and samples["medha:prompt_tokens_total", None] > 0
        assert samples["medha:kv_cache_total_blocks", None] == stats["total_blocks"]
        assert "# TYPE medha:request_success_total counter" in metrics.text
        await engine.stop()
        assert (await http.get("/health")).status_code == 503
        assert (await http.get("/ping")).status_code == 503
        with pytest.raises(openai.APIStatusError) as closed:
            await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert closed.value.status_code == 503


def test_usage_counts_each_prompts_cached_tokens_once_the_least_of_its_choices() -> None:
    # Two prompts x n=2: choice i is prompt i // 2's; a later choice found what the first
    # computed, which was not in the cache before the request.
    choices = []
    for index, cached in enumerate([0, 32, 16, 48]):
        choice = ChoiceOutput(index, token_ids=[1, 2])
        choice.metrics = RequestMetrics(arrival=0.0, deadline=1.0, cached_tokens=cached)
        choices.append(choice)
    counts = usage(choices, [40, 50])
    assert counts["prompt_tokens_details"] == {"cached_tokens": 0 + 16}
    assert (counts["prompt_tokens"], counts["completion_tokens"]) == (90, 8)


async def test_usage_counts_the_prompt_tokens_the_prefix_cache_held() -> None:
    document = " ".join(f"word{i}" for i in range(40))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "temperature": 0.0}
    body["extra_body"] = {"ignore_eos": True}
    async with serving() as (engine, client):
        ids = engine.tokenize(document)
        block = engine.config.block_size
        first = await client.completions.create(**body, prompt=document, n=2)
        both = await client.completions.create(**body, prompt=[f"{document} more", "new words"])
        stream = await client.completions.create(
            **body, prompt=document, stream=True, stream_options={"include_usage": True}
        )
        last = [chunk async for chunk in stream][-1]
        assert len(ids) % block and engine.tokenize(f"{document} more")[: len(ids)] == ids

    def cached(done: Any) -> int:
        assert done.usage is not None and done.usage.prompt_tokens_details is not None
        return int(done.usage.prompt_tokens_details.cached_tokens)

    # The first prompt's second choice finds it cached, but nothing was before the request.
    assert cached(first) == 0
    # The document's whole blocks, for the prompt that starts with it; none for the other.
    assert cached(both) == cached(last) == len(ids) // block * block > 0


async def test_a_cache_salt_keeps_prefixes_to_the_requests_that_share_it() -> None:
    document = " ".join(f"word{i}" for i in range(40))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "temperature": 0.0}
    async with serving() as (engine, client):
        block = engine.config.block_size

        async def cached(endpoint: str, salt: str | None, **fields: Any) -> int:
            extra = {"ignore_eos": True, **({} if salt is None else {"cache_salt": salt})}
            if endpoint == "chat":
                messages = [{"role": "user", "content": document}]
                done: Any = await client.chat.completions.create(
                    **body, messages=messages, extra_body=extra
                )
            else:
                done = await client.completions.create(**body, prompt=document, extra_body=extra)
            return int(done.usage.prompt_tokens_details.cached_tokens)

        for endpoint in ("completions", "chat"):
            assert await cached(endpoint, "a") == 0
            assert await cached(endpoint, "b") == 0
            assert await cached(endpoint, None) == 0
            assert await cached(endpoint, "a") >= block
        bad = await client._client.post(
            "http://medha/v1/completions", json={**body, "prompt": "x", "cache_salt": ""}
        )
        assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


def test_a_tokens_text_offset_counts_the_held_back_text_before_it() -> None:
    from medha.server.responses import ChoiceOutput

    texts = {1: "eas", 2: "\ufffd", 3: " autum", 4: " S", 5: "TO", 6: "P"}

    def event(token_id: int, text: str) -> medha.TokenEvent:
        return medha.TokenEvent("r", token_id, text)

    output = ChoiceOutput(0, token_text=texts.__getitem__)
    # A byte that never formed a character comes out (U+FFFD) with the next token's text; a
    # possible start of a stop string (" STOPPED") is held until it cannot be one.
    for token_id, text in [
        (1, "eas"),
        (2, ""),
        (3, "\ufffd autum"),
        (4, ""),
        (5, ""),
        (6, " STOP"),
    ]:
        output.add(event(token_id, text))
    assert output.text == "eas\ufffd autum STOP"
    assert output.text_offsets == [0, 3, 4, 10, 12, 14]
    starts = zip(range(1, 7), output.text_offsets, strict=True)
    assert [output.text.find(texts[t], at) for t, at in starts] == output.text_offsets


def test_the_byte_pieces_of_one_character_never_send_text_offset_back() -> None:
    """Four byte tokens of one emoji, each U+FFFD alone, held back until the character is
    whole: they count as the one character they make (counted as four, the token after it had
    gone back from 4 to 2), and every offset stays within the text."""
    from medha.server.responses import ChoiceOutput

    texts = {1: "a", 2: "\ufffd", 3: "\ufffd", 4: "\ufffd", 5: "\ufffd", 6: "b"}
    output = ChoiceOutput(0, token_text=texts.__getitem__)
    for token_id, text in [(1, "a"), (2, ""), (3, ""), (4, ""), (5, "😀"), (6, "b")]:
        output.add(medha.TokenEvent("r", token_id, text))
    assert output.text == "a😀b"
    assert output.text_offsets == [0, 1, 2, 2, 2, 2]
    assert output.text[output.text_offsets[-1]] == "b"
