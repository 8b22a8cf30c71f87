"""The public Engine API: stream() and generate() agree, inputs are validated with typed errors
before anything is queued, leaving a stream aborts its request, a closed engine says so."""

from __future__ import annotations

import dataclasses
import math

import anyio
import numpy as np
import pytest
import torch

import medha
from medha import (
    EngineClosedError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestTooLargeError,
    SamplingParams,
)
from tests.engine_support import MODEL, cost_profile_path, engine_config

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _wait_idle(engine: medha.Engine) -> medha.EngineStats:
    with anyio.fail_after(10):
        while True:
            stats = engine.stats()
            if stats.running == 0 and stats.waiting == 0 and stats.preempted == 0:
                return stats
            await anyio.sleep(0.01)


async def test_stream_and_generate_give_the_same_tokens_and_text() -> None:
    async with medha.Engine(engine_config()) as engine:
        events = [ev async for ev in engine.stream("The quick brown fox", GREEDY)]
        done = await engine.generate("The quick brown fox", GREEDY)
    assert [ev.token_id for ev in events] == done.token_ids
    assert "".join(ev.text for ev in events) == done.text
    assert [ev.finish_reason for ev in events] == [None] * 11 + ["length"]
    assert done.finish_reason == "length"
    assert done.metrics.ttft is not None and done.metrics.ttft > 0
    assert done.metrics.tpot is not None and done.metrics.e2e >= done.metrics.ttft


async def test_a_streams_last_event_carries_the_requests_metrics() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        events = [ev async for ev in engine.stream("The quick brown fox", GREEDY, deadline=7.5)]
        assert all(ev.metrics is None for ev in events[:-1])
        metrics = events[-1].metrics
        assert metrics is not None and metrics.num_output_tokens == 12
        assert metrics.deadline == 7.5 and metrics.deadline_met is True
        assert metrics.finished_time is not None and metrics.ttft is not None
        # An aborted stream's last event too, with its end time.
        aborted = []
        async for ev in engine.stream("abort me", params, request_id="victim"):
            aborted.append(ev)
            if len(aborted) == 2:
                await engine.abort("victim")
        assert aborted[-1].finish_reason == "abort" and aborted[-1].metrics is not None
        assert aborted[-1].metrics.num_output_tokens == len(aborted) - 1
        assert aborted[-1].metrics.finished_time is not None


async def test_tokenize_gives_the_ids_a_request_runs() -> None:
    truncating = SamplingParams(max_tokens=2, temperature=0.0, truncate_prompt_tokens=4)
    async with medha.Engine(engine_config()) as engine:
        text = "The quick brown fox jumps over the lazy dog"
        assert engine.tokenize(text) == engine.tokenizer.encode(text)
        ids = engine.tokenize(text, truncating)
        done = await engine.generate(text, truncating)
        assert ids == done.prompt_token_ids and len(ids) == 4
        assert engine.tokenize(np.array([3, 4, 5])) == [3, 4, 5]
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            engine.tokenize([1, 10**9])
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.tokenize("")
    with pytest.raises(EngineClosedError):
        engine.tokenize(text)


async def test_prompt_may_be_token_ids_and_sampling_is_reproducible_with_a_seed() -> None:
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=11, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        first = await engine.generate([5, 6, 7, 8, 9], params)
        second = await engine.generate([5, 6, 7, 8, 9], params)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 8


async def test_deadline_met_compares_ttft_with_the_callers_deadline() -> None:
    async with medha.Engine(engine_config()) as engine:
        relaxed = await engine.generate("hello", GREEDY, deadline=30.0)
        impossible = await engine.generate("hello", GREEDY, deadline=1e-9)
        default = await engine.generate("hello", GREEDY)
    assert relaxed.metrics.deadline == 30.0 and relaxed.metrics.deadline_met is True
    assert impossible.metrics.deadline_met is False
    # No deadline given: the scheduler's default, max(1.5 x predicted prefill, 0.5 s).
    assert default.metrics.deadline == pytest.approx(0.5) and not default.metrics.deadline_given


async def test_the_default_deadline_follows_the_configured_factor_and_floor() -> None:
    prompt = list(range(3, 203))
    fixed = {"online_time_scale": False}  # the predictions, hence the deadlines, stay put

    async def deadline(**settings: float) -> tuple[float, float]:
        async with medha.Engine(engine_config(**fixed, **settings)) as engine:
            work = engine._actor().scheduler.cost.prefill_time(len(prompt))
            return (await engine.generate(prompt, GREEDY)).metrics.deadline, work

    scaled, work = await deadline(min_deadline=1e-6)
    assert 1.5 * work > 1e-6 and scaled == pytest.approx(1.5 * work)
    doubled, work = await deadline(min_deadline=1e-6, deadline_factor=3.0)
    assert doubled == pytest.approx(3.0 * work)
    floored, _ = await deadline(min_deadline=7.0)
    assert floored == 7.0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda e: e.stream(""), InvalidRequestError),
        (lambda e: e.stream("caf\udce9"), InvalidRequestError),  # bytes that were not UTF-8
        (lambda e: e.stream([]), InvalidRequestError),
        (lambda e: e.stream(42), InvalidRequestError),
        (lambda e: e.stream([1, "2"]), InvalidRequestError),
        (lambda e: e.stream([1, True]), InvalidRequestError),
        (lambda e: e.stream([1, 10**6]), InvalidRequestError),
        (lambda e: e.stream([-1]), InvalidRequestError),
        (lambda e: e.stream([1] * 5000), PromptTooLongError),
        (lambda e: e.stream("hi", SamplingParams(max_tokens=5000)), PromptTooLongError),
        (lambda e: e.stream("hi", {"max_tokens": 3}), InvalidRequestError),
        (lambda e: e.stream("hi", deadline=-1.0), InvalidRequestError),
        (lambda e: e.stream("hi", deadline=math.nan), InvalidRequestError),
        (lambda e: e.stream("hi", deadline="soon"), InvalidRequestError),
        (lambda e: e.stream("hi", SamplingParams(max_tokens=4000)), RequestTooLargeError),
        # max_tokens None: no room after the prompt, in the context or the KV cache.
        (lambda e: e.stream([1] * 4096, SamplingParams(max_tokens=None)), PromptTooLongError),
        (lambda e: e.stream([1] * 1024, SamplingParams(max_tokens=None)), RequestTooLargeError),
        (
            lambda e: e.stream([1] * 1000, SamplingParams(max_tokens=None, min_tokens=30)),
            RequestTooLargeError,
        ),
    ],
)
async def test_bad_input_raises_a_typed_error_before_queueing(call, error) -> None:  # type: ignore[no-untyped-def]
    async with medha.Engine(engine_config(num_blocks=64)) as engine:
        with pytest.raises(error):
            call(engine)
        assert issubclass(error, ValueError)
        stats = engine.stats()
        assert stats.waiting == stats.running == 0 and stats.free_blocks == stats.total_blocks


@pytest.mark.parametrize(
    "make",
    [
        lambda: SamplingParams(max_tokens=0),
        lambda: SamplingParams(temperature=-0.1),
        lambda: SamplingParams(top_p=0.0),
        lambda: SamplingParams(top_p=1.5),
        lambda: SamplingParams(stop=5),  # type: ignore[arg-type]
    ],
)
def test_bad_sampling_params_raise_a_typed_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSamplingParamsError):
        make()


@pytest.mark.parametrize(
    ("config", "room"),
    [
        ({"max_model_len": 40}, 40),  # the context is the limit
        ({"num_blocks": 3}, 48),  # the KV cache is (3 blocks of 16 tokens)
    ],
)
async def test_max_tokens_none_generates_what_the_context_and_cache_leave(
    config: dict[str, int], room: int
) -> None:
    prompt = [5, 6, 7, 8, 9, 10]
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config(**config)) as engine:
        done = await engine.generate(prompt, params)
        stats = engine.stats()
    assert len(done.token_ids) == room - len(prompt)
    assert done.finish_reason == "length"
    assert stats.free_blocks == stats.total_blocks


async def test_bad_input_does_not_disturb_a_request_already_streaming() -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        tokens: list[int | None] = []
        async for ev in engine.stream("keep going", params):
            tokens.append(ev.token_id)
            if len(tokens) == 3:
                for bad in ("", [10**6], 3.5):
                    with pytest.raises(InvalidRequestError):
                        engine.stream(bad)  # type: ignore[arg-type]
        alone = await engine.generate("keep going", params)
    assert tokens == alone.token_ids


async def test_text_encoding_to_ids_the_model_lacks_is_refused_before_queueing() -> None:
    """A tokenizer may hold ids beyond the model's vocabulary (transformers' GGUF conversion
    adds <|endoftext|> to Llama-3 files); text spelling such a token is bad input, not a
    failed engine. Here the engine is told its model has fewer ids than the text needs."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        ids = engine.tokenizer.encode("hello there")
        prompts = engine._prompts
        assert prompts is not None
        engine._prompts = dataclasses.replace(prompts, vocab_size=max(ids))
        with pytest.raises(
            InvalidRequestError, match=f"token ids the model does not have: \\[{max(ids)}"
        ):
            engine.stream("hello there", params)
        engine._prompts = prompts
        assert (await engine.generate("hello there", params)).finish_reason == "length"
        assert engine.stats().finished == 1


async def test_leaving_async_for_early_aborts_the_request_and_frees_its_kv() -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        async for ev in engine.stream("a long answer please", params):
            if ev.token_id is not None:
                break
        stats = await _wait_idle(engine)
        assert stats.free_blocks == stats.total_blocks
        assert stats.aborted == 1 and stats.finished == 0


async def test_cancelling_the_consuming_task_aborts_the_request() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in engine.stream("cancel me", params):
                seen += 1

        with anyio.move_on_after(0.3):
            await consume()
        assert 0 < seen < 500
        stats = await _wait_idle(engine)
        assert stats.aborted == 1 and stats.free_blocks == stats.total_blocks


async def test_abort_by_request_id_ends_the_stream_with_an_abort_event() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        stream = engine.stream("abort me", params, request_id="victim")
        events = []
        async for ev in stream:
            events.append(ev)
            if len(events) == 2:
                await engine.abort("victim")
        assert len(events) < 500
        # As vLLM's final output of an aborted request: the reason, and no new token.
        last = events[-1]
        assert (last.finish_reason, last.token_id, last.text) == ("abort", None, "")
        assert all(ev.token_id is not None and ev.finish_reason is None for ev in events[:-1])
        stats = await _wait_idle(engine)
        assert stats.free_blocks == stats.total_blocks
        await engine.abort("victim")  # again, once it is gone: nothing happens
        assert engine.stats().aborted == 1


async def test_abort_by_id_of_a_stream_not_yet_iterated_queues_nothing() -> None:
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        stream = engine.stream("never started", params, request_id="early")
        await engine.abort("early")
        events = [ev async for ev in stream]
        assert [(ev.finish_reason, ev.token_id) for ev in events] == [("abort", None)]
        stats = engine.stats()
        assert stats.iterations == 0 and stats.waiting == 0 and stats.running == 0
        # The id is free again.
        assert (await engine.generate("fine", params, request_id="early")).finish_reason == "length"


async def test_abort_takes_several_ids_as_vllm_does_and_refuses_a_non_str_id() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        for bad in (["fine", 5], 5, None, b"id", {"id": 1}):
            with pytest.raises(InvalidRequestError, match="a request id is a str"):
                await engine.abort(bad)  # type: ignore[arg-type]
        streams = [engine.stream(f"abort {i}", params, request_id=f"r{i}") for i in range(3)]
        ends: dict[str, str | None] = {}

        async def consume(index: int) -> None:
            async for ev in streams[index]:
                ends[f"r{index}"] = ev.finish_reason

        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(consume, index)
            while engine.stats().running < 3:
                await anyio.sleep(0.005)
            await engine.abort(iter(["r0", "r2", "nobody"]))
            await anyio.sleep(0.2)
            assert ends["r1"] is None  # still streaming
            await engine.abort("r1")
        assert ends == {"r0": "abort", "r1": "abort", "r2": "abort"}
        stats = await _wait_idle(engine)
        assert stats.aborted == 3 and stats.free_blocks == stats.total_blocks


async def test_an_aborted_completion_has_its_end_time() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        async with anyio.create_task_group() as group:
            results = []

            async def run() -> None:
                results.append(await engine.generate("long one", params, request_id="cut"))

            group.start_soon(run)
            while engine.stats().iterations < 3:
                await anyio.sleep(0.01)
            await engine.abort("cut")
        (done,) = results
        assert done.finish_reason == "abort" and 0 < len(done.token_ids) < 500
        assert done.metrics.e2e is not None and done.metrics.e2e >= done.metrics.ttft


async def test_a_closed_engine_raises_engine_closed_error() -> None:
    engine = medha.Engine(engine_config())
    with pytest.raises(EngineClosedError):
        engine.stream("not started")
    async with engine:
        pass
    with pytest.raises(EngineClosedError):
        engine.stream("closed")
    with pytest.raises(EngineClosedError):
        await engine.generate("closed")


async def test_open_streams_end_with_engine_closed_error_when_the_engine_stops() -> None:
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    received = 0
    with pytest.raises(EngineClosedError):
        async with medha.Engine(engine_config()) as engine:
            async for _ in engine.stream("endless", params):
                received += 1
                if received == 3:
                    await engine.stop()
    assert received == 3


def test_llm_generates_synchronously_in_order() -> None:
    with medha.LLM(engine_config()) as llm:
        results = llm.generate(["one", "two", [7, 8, 9]], GREEDY)
    assert [len(r.token_ids) for r in results] == [12, 12, 12]
    assert results[0].prompt_token_ids != results[1].prompt_token_ids


def test_llm_takes_prompts_as_arrays_and_iterables() -> None:
    with medha.LLM(engine_config()) as llm:
        (one,) = llm.generate(np.array([7, 8, 9]), GREEDY)
        rows = llm.generate(np.array([[7, 8, 9], [4, 5, 6]]), GREEDY)
        lazy = llm.generate((p for p in ("one", [4, 5, 6])), GREEDY)
        with pytest.raises(InvalidRequestError, match="prompts must be"):
            llm.generate(3.5, GREEDY)  # type: ignore[arg-type]
    assert one.prompt_token_ids == [7, 8, 9] == rows[0].prompt_token_ids
    assert rows[1].prompt_token_ids == [4, 5, 6] == lazy[1].prompt_token_ids
    assert one.token_ids == rows[0].token_ids


def test_llm_chat_renders_the_chat_template_as_vllm_does() -> None:
    hello = [{"role": "user", "content": "Hello"}]
    bye = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bye"}]
    with medha.LLM(engine_config()) as llm:
        (one,) = llm.chat(hello, GREEDY)
        # OpenAI's content parts are joined into the text, not rendered as a Python repr.
        (parts,) = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
        assert parts.prompt_token_ids == llm.engine.tokenizer.apply_chat_template(hello)
        with pytest.raises(InvalidRequestError, match="only text content parts"):
            llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
        both = llm.chat([hello, bye], GREEDY)
        ids = llm.engine.tokenizer.apply_chat_template(hello)
        (direct,) = llm.generate([ids], GREEDY)
        for bad in ([], [{"content": "no role"}], "Hello"):
            with pytest.raises(InvalidRequestError):
                llm.chat(bad, GREEDY)  # type: ignore[arg-type]
        assert llm.engine.stats().waiting == 0
    assert one.prompt_token_ids == ids == both[0].prompt_token_ids
    assert one.token_ids == direct.token_ids == both[0].token_ids
    assert both[1].prompt_token_ids == llm.engine.tokenizer.apply_chat_template(bye)


def test_llm_chat_shows_the_tools_and_earlier_calls_to_the_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_server_tools import TEMPLATE, TIME, WEATHER

    called = {"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    history = [
        {"role": "user", "content": "Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [called]},
    ]
    with medha.LLM(engine_config()) as llm:
        tokenizer = llm.engine.tokenizer
        monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", TEMPLATE)
        (done,) = llm.chat(history, GREEDY, tools=[WEATHER, TIME])
        oops = {"function": {"name": "f", "arguments": "{oops"}}
        broken = [{"role": "assistant", "tool_calls": [oops]}]
        with pytest.raises(InvalidRequestError, match="arguments is not JSON"):
            llm.chat(broken, GREEDY)
        # JSON escapes a lone surrogate, which no tokenizer encodes: typed, as the server's.
        lone = {"function": {"name": "f", "arguments": '{"city": "\\ud800"}'}}
        with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
            llm.chat([{"role": "assistant", "tool_calls": [lone]}], GREEDY, tools=[WEATHER])
        with pytest.raises(InvalidRequestError, match="tools must be a list"):
            llm.chat(history, GREEDY, tools=WEATHER)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=r"tools\[1\] must be a dict"):
            llm.chat(history, GREEDY, tools=[WEATHER, "get_time"])  # type: ignore[list-item]
        # A template adding a name to a number: the chat's values do not fit it.
        monkeypatch.setattr(
            tokenizer.hf_tokenizer, "chat_template", "{{ 1 + messages[0].content }}"
        )
        with pytest.raises(InvalidRequestError, match="cannot render"):
            llm.chat(history, GREEDY)
        assert llm.engine.stats().finished == 1
    assert tokenizer.decode(done.prompt_token_ids) == (
        "TOOLS: get_weather get_time\nuser: Rome?\nassistant:  CALL get_weather(Rome)\nassistant:"
    )


def test_llm_chat_continues_the_final_message_with_the_templates_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_tokenizer import THINKING

    answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    with medha.LLM(engine_config()) as llm:
        monkeypatch.setattr(llm.engine.tokenizer.hf_tokenizer, "chat_template", THINKING)
        (done,) = llm.chat(
            answer,
            GREEDY,
            add_generation_prompt=False,
            continue_final_message=True,
            chat_template_kwargs={"enable_thinking": False},
        )
        with pytest.raises(InvalidRequestError, match="set one of them"):
            llm.chat(answer, GREEDY, continue_final_message=True)
    assert llm.engine.tokenizer.decode(done.prompt_token_ids) == "/no_think HiHello, I"


def test_llm_takes_one_sampling_params_per_prompt_as_vllm_does() -> None:
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with medha.LLM(engine_config()) as llm:
        mixed = llm.generate(["one", "two"], [GREEDY, short])
        alone = llm.generate("two", short)
        with pytest.raises(InvalidRequestError, match="2 prompts but 1 SamplingParams"):
            llm.generate(["one", "two"], [GREEDY])
        with pytest.raises(InvalidRequestError, match="sampling must be"):
            llm.generate(["one", "two"], [GREEDY, {"max_tokens": 3}])  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="a list of them"):
            llm.generate(["one"], "greedy")  # type: ignore[arg-type]
        assert llm.engine.stats().finished == 3  # nothing of the refused calls was queued
    assert [len(r.token_ids) for r in mixed] == [12, 3]
    assert mixed[1].token_ids == alone[0].token_ids


def test_llm_takes_a_model_name_and_config_fields_as_vllm_does() -> None:
    with medha.LLM(MODEL, cost_profile=cost_profile_path(), num_blocks=64) as llm:
        assert llm.engine.config == engine_config(num_blocks=64)
    with pytest.raises(TypeError, match="not both"):
        medha.LLM(engine_config(), dtype="bfloat16")
    with pytest.raises(TypeError, match="twice"):
        medha.LLM(MODEL, model=MODEL)
    with pytest.raises(TypeError, match="EngineConfig"):
        medha.Engine(MODEL)  # type: ignore[arg-type]


async def test_token_id_prompts_may_be_numpy_arrays_or_tensors() -> None:
    async with medha.Engine(engine_config()) as engine:
        expected = (await engine.generate([7, 8, 9], GREEDY)).token_ids
        for prompt in (np.array([7, 8, 9]), torch.tensor([7, 8, 9])):
            assert (await engine.generate(prompt, GREEDY)).token_ids == expected
        with pytest.raises(InvalidRequestError, match="must hold ints"):
            engine.stream(np.array([[7, 8], [9, 10]]))
