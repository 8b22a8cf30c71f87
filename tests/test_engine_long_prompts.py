"""Long prompts are tokenized and checked on a worker thread when their stream starts
(medha.request_prompt), so that other streams keep going meanwhile; what they run is what an
inline prompt runs, and their errors, aborts and cancellations leave nothing behind."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest

import medha
from medha import EngineClosedError, InvalidRequestError, PromptTooLongError, SamplingParams
from medha.request_prompt import LONG_PROMPT
from tests.engine_support import HeldEncode, engine_config, long_from

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG_TEXT = "word " * (LONG_PROMPT // 5 + 1)  # ~9.8K tokens: more than the context of 4096


async def _idle(engine: medha.Engine) -> medha.EngineStats:
    with anyio.fail_after(10):
        while (stats := engine.stats()).running or stats.waiting:
            await anyio.sleep(0.01)
    assert stats.free_blocks == stats.total_blocks
    return stats


async def test_other_streams_keep_their_tokens_while_a_long_prompt_is_tokenized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        tokens_while_held = 0
        failure: list[BaseException] = []

        async def long_request() -> None:
            try:
                await engine.generate(LONG_TEXT, GREEDY, request_id="long")
            except PromptTooLongError as exc:
                failure.append(exc)

        async with anyio.create_task_group() as group:
            stream = engine.stream("keep going", params)
            async for _ in stream:
                if not held.entered.is_set():
                    if tokens_while_held == 0:
                        group.start_soon(long_request)
                        await held.wait_entered()
                    continue
                tokens_while_held += 1
                if tokens_while_held == 5:
                    held.release.set()
                    break
            await stream.aclose()
        assert tokens_while_held == 5 and not held.timed_out
        assert held.threads[0] != threading.get_ident()  # the loop's thread
        assert len(failure) == 1 and "context of 4096" in str(failure[0])
        stats = await _idle(engine)
        assert stats.finished == 0  # the long request was never queued
        # Its id is free again.
        assert (await engine.generate("x", GREEDY, request_id="long")).finish_reason == "length"


def _prompts(engine: medha.Engine) -> list[Any]:
    text = "the long document " * 12
    ids = engine.tokenizer.encode(text)
    return [text, ids, tuple(ids), np.array(ids, dtype=np.int64)]


async def _completions(engine: medha.Engine, prompt: Any) -> list[medha.Completion]:
    runs = [
        GREEDY,
        SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, logprobs=1),
        SamplingParams(max_tokens=4, temperature=0.0, truncate_prompt_tokens=40),
    ]
    return [await engine.generate(prompt, params) for params in runs]


async def _to_the_context_end(engine: medha.Engine) -> medha.Completion:
    """max_tokens None: as many as the context leaves after 4090 prompt tokens (6)."""
    prompt = (engine.tokenizer.encode("the long document ") * 500)[:4090]
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    return await engine.generate(prompt, params)


async def test_a_prompt_prepared_off_the_loop_runs_as_one_prepared_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every kind of prompt, with the parameters its preparation depends on (truncation, the
    output limit, prompt logprobs), prepared inline and then off the loop."""
    async with medha.Engine(engine_config()) as engine:
        inline = [await _completions(engine, prompt) for prompt in _prompts(engine)]
        inline.append([await _to_the_context_end(engine)])
        long_from(monkeypatch, 10)
        off_loop = [await _completions(engine, prompt) for prompt in _prompts(engine)]
        off_loop.append([await _to_the_context_end(engine)])
        # Its block digests were taken: the prefix cache serves it.
        hits = engine.stats().prefix_cache_hit_tokens
        await engine.generate(_prompts(engine)[0], GREEDY)
        assert engine.stats().prefix_cache_hit_tokens - hits >= engine.config.block_size
        await _idle(engine)
    for before, after in zip(inline, off_loop, strict=True):
        for a, b in zip(before, after, strict=True):
            assert b.prompt_token_ids == a.prompt_token_ids
            assert b.token_ids == a.token_ids and b.text == a.text
            assert b.finish_reason == a.finish_reason
            assert b.logprobs == a.logprobs and b.prompt_logprobs == a.prompt_logprobs
    assert len(inline[0][2].prompt_token_ids) == 40
    assert len(inline[-1][0].token_ids) == 6 and inline[-1][0].finish_reason == "length"


async def test_a_long_prompts_errors_come_from_its_iteration_and_queue_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        too_long = "word " * 2000
        stream = engine.stream(too_long, GREEDY, request_id="a")  # no tokens yet: no error
        with pytest.raises(PromptTooLongError, match="context of 4096"):
            async for _ in stream:
                pass
        # A token-id prompt's length needs no tokenizing: refused at once, unless it is to
        # be truncated to fit.
        with pytest.raises(PromptTooLongError):
            engine.stream(list(range(1, 300)) * 20, GREEDY, request_id="a")
        keep_end = SamplingParams(max_tokens=2, truncate_prompt_tokens=100)
        kept = await engine.generate(list(range(1, 300)) * 20, keep_end, request_id="a")
        assert len(kept.prompt_token_ids) == 100
        outside = [1] * 20 + [10**6]
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await engine.generate(outside, GREEDY, request_id="a")
        with pytest.raises(InvalidRequestError, match="must hold ints"):
            await engine.generate([1] * 20 + ["x"], GREEDY, request_id="a")  # type: ignore[list-item]
        stats = await _idle(engine)
        assert stats.finished == 1 and stats.aborted == 0
        # Every refusal freed the id.
        assert (await engine.generate("x" * 20, GREEDY, request_id="a")).finish_reason == "length"


async def test_aborting_a_request_while_its_prompt_is_tokenized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        events: list[medha.TokenEvent] = []

        async def consume() -> None:
            async for event in engine.stream("a prompt that is long", GREEDY, request_id="r"):
                events.append(event)

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await held.wait_entered()
            await engine.abort("r")
            held.release.set()
        assert [(e.token_id, e.finish_reason) for e in events] == [(None, "abort")]
        stats = await _idle(engine)
        assert stats.finished == stats.aborted == 0  # never queued
        assert (await engine.generate("again, long", GREEDY, request_id="r")).token_ids


async def test_cancelling_a_stream_while_its_prompt_is_tokenized_frees_its_id_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        async with anyio.create_task_group() as group:
            group.start_soon(partial(engine.generate, "a long prompt", GREEDY, request_id="r"))
            await held.wait_entered()
            group.cancel_scope.cancel()
        # Returned at once, though the tokenizer still holds: the id is free already.
        assert not held.release.is_set()
        engine.stream("x", GREEDY, request_id="r")
        held.release.set()
        stats = await _idle(engine)
        assert stats.finished == stats.aborted == 0


async def test_an_engine_stopped_while_a_prompt_is_tokenized_ends_its_stream_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    errors: list[BaseException] = []
    engine = medha.Engine(engine_config())
    held: HeldEncode | None = None

    async def consume() -> None:
        try:
            await engine.generate("a prompt that is long", GREEDY)
        except EngineClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        async with engine:
            held = HeldEncode(engine, monkeypatch)
            group.start_soon(consume)
            await held.wait_entered()
        held.release.set()
    assert len(errors) == 1
