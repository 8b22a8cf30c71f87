"""Long prompts are tokenized and checked on a worker thread when their stream starts
(medha.request_prompt), so that other streams keep going meanwhile; what they run is what an
inline prompt runs, and their errors, aborts and cancellations leave nothing behind."""

from __future__ import annotations

import gc
import threading
import warnings
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest

import medha
from medha import EngineClosedError, InvalidRequestError, PromptTooLongError, SamplingParams
from medha.request_prompt import LONG_PROMPT
from tests.engine_support import HeldEncode, engine_config, idle, long_from

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LONG_TEXT = "word " * (LONG_PROMPT // 5 + 1)  # ~9.8K tokens: more than the context of 4096


async def test_other_streams_keep_going_while_a_long_prompt_is_tokenized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        failure: list[BaseException] = []

        async def long_request() -> None:
            try:
                await engine.generate(LONG_TEXT, GREEDY, request_id="long")
            except PromptTooLongError as exc:
                failure.append(exc)

        await held.run_while_others_stream(engine, long_request)
        assert held.threads[0] != threading.get_ident()  # the loop's thread
        assert len(failure) == 1 and "context of 4096" in str(failure[0])
        stats = await idle(engine)
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
        await idle(engine)
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
        stats = await idle(engine)
        assert stats.finished == 1 and stats.aborted == 0
        # Every refusal freed the id.
        assert (await engine.generate("x" * 20, GREEDY, request_id="a")).finish_reason == "length"


async def _end_of(stream: Any, events: list[Any]) -> None:
    """Consume `stream` into `events`; its error, if it raises, as the last one."""
    try:
        async for event in stream:
            events.append(event)
    except Exception as exc:
        events.append(exc)


async def _until(condition: Any) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.005)


async def test_an_abort_ends_a_stream_whose_prompt_is_tokenized_or_waits_its_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One prompt is being tokenized, another waits behind it for the tokenizer thread: an
    abort ends either stream at once, and the waiting one's text is never tokenized."""
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        first: list[Any] = []
        second: list[Any] = []
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_end_of, engine.stream("a first long one", request_id="a"), first)
                await held.wait_entered()
                group.start_soon(
                    _end_of, engine.stream("a second long one", request_id="b"), second
                )
                await anyio.sleep(0.05)  # queued behind the first
                await engine.abort(["b", "a"])
                await _until(lambda: first and second)
                assert not held.release.is_set()  # the first is still being tokenized
        finally:
            held.release.set()
        for events in (first, second):
            assert [(e.token_id, e.finish_reason) for e in events] == [(None, "abort")]
            metrics = events[0].metrics
            # It arrived when its iteration started, before the abort.
            assert 0 < metrics.arrival < metrics.finished_time and metrics.ttft is None
        assert len(held.threads) == 1  # the second text never reached the tokenizer
        stats = await idle(engine)
        assert stats.finished == stats.aborted == 0  # never queued
        assert (await engine.generate("again, long", GREEDY, request_id="a")).token_ids


async def test_cancelling_a_stream_while_its_prompt_is_tokenized_frees_its_id_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        held = HeldEncode(engine, monkeypatch)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(partial(engine.generate, "a long prompt", GREEDY, request_id="r"))
                await held.wait_entered()
                group.cancel_scope.cancel()
            # Returned at once, though the tokenizer still holds: the id is free already.
            assert not held.release.is_set()
            engine.stream("x", GREEDY, request_id="r")
        finally:
            held.release.set()
        stats = await idle(engine)
        assert stats.finished == stats.aborted == 0


async def test_an_engine_stopped_while_prompts_are_tokenized_ends_their_streams_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    events: list[list[Any]] = [[], []]
    engine = medha.Engine(engine_config())
    async with anyio.create_task_group() as group, engine:
        held = HeldEncode(engine, monkeypatch)
        try:
            group.start_soon(_end_of, engine.stream("one long prompt"), events[0])
            await held.wait_entered()
            group.start_soon(_end_of, engine.stream("another long one"), events[1])
            await anyio.sleep(0.05)
            await engine.stop()
            await _until(lambda: all(events))
            assert not held.release.is_set()
        finally:
            held.release.set()
    assert [type(e[0]) for e in events] == [EngineClosedError, EngineClosedError]
    assert len(held.threads) == 1


async def test_a_long_token_id_prompt_is_taken_when_the_stream_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a short one's: the caller may reuse its list or array before iterating."""
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        original = list(range(5, 40))
        expected = (await engine.generate(original, GREEDY)).token_ids
        for make in (list, np.array):
            prompt = make(original)
            stream = engine.stream(prompt, GREEDY)
            prompt[:] = [1] * len(original)
            tokens = [event.token_id async for event in stream]
            assert tokens == expected


async def test_a_refused_long_prompt_leaves_no_stream_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_from(monkeypatch, 10)
    async with medha.Engine(engine_config()) as engine:
        gc.collect()  # earlier tests' garbage: not this one's to report
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(PromptTooLongError) as _:
                await engine.generate("word " * 2000)
            # The error's traceback holds the request: gone once the error is, and once the
            # loop's callback that resumed this task with it has returned.
            del _
            await anyio.sleep(0.01)
            gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
