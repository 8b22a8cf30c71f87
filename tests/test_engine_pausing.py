"""The engine pauses a long prompt's iteration between layers for a request that should go
first: when it arrives ahead of it, or when it overtakes it later (LARS); never under FCFS or
with pausing off. Outputs stay exactly those of each request alone; an abort that comes while
an iteration is paused frees everything, and closing the engine then ends every stream.

The model's layers are slowed down for chunks of >= 256 tokens only (the long prompt's, and
SLOW_SHORT's), so that an iteration lasts long enough for the short request to arrive, and
overtake, inside it."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

import medha
from medha import SamplingParams, StructuredOutputsParams
from medha.model.llama import DecoderLayer
from medha.perf.time_scale import OnlineTimeScale
from tests.engine_support import engine_config, greedy_alone, greedy_under_grammar

pytestmark = pytest.mark.anyio

LONG = tuple(random.Random(5).randrange(384) for _ in range(1024))
SHORT = (1, 2, 3, 4)
SLOW_SHORT = LONG[:300]
"""A short prompt whose chunk (>= 256 tokens) the slow_long_chunks fixture slows down too."""
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
TALKER_PARAMS = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def slow_long_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer sleeps 0.4 s before a chunk of >= 256 tokens (the long prompt's)."""
    forward = DecoderLayer.forward

    def slow(self: DecoderLayer, x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] >= 256:
            time.sleep(0.4)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", slow)


@dataclass
class Played:
    results: dict[str, medha.Completion]
    order: list[tuple[int, str]]
    """(step id, request ids) per iteration, in the order iterations completed."""
    pauses: int
    stats: medha.EngineStats
    long_events: list[medha.TokenEvent]
    """The long request's stream, when it was aborted (its events, as a caller sees them)."""

    @property
    def long(self) -> medha.Completion:
        return self.results["long"]

    @property
    def short(self) -> medha.Completion:
        return self.results["short"]


async def _long_then_short(
    short_deadline: float | None,
    long_deadline: float | None = None,
    after_iterations: int = 0,
    abort_long: bool = False,
    talker: bool = False,
    short_prompt: tuple[int, ...] = SHORT,
    talker_params: SamplingParams = TALKER_PARAMS,
    **config: Any,
) -> Played:
    """Play the long prompt (chunks of 512: two iterations), and the short one once
    `after_iterations` iterations are done and the next is under way; with `abort_long`,
    abort the long one once its iteration is paused; with `talker`, a request decoding
    `talker_params` starts first, so its decodes share the long prompt's iterations."""
    settings = {"policy": "lars", "max_chunk": 512, "target_batch_time": 0.05, **config}
    results: dict[str, medha.Completion] = {}
    long_events: list[medha.TokenEvent] = []
    async with medha.Engine(engine_config(**settings), record_iterations=True) as engine:

        async def run(name: str, prompt: tuple[int, ...], deadline: float | None) -> None:
            params = talker_params if name == "talker" else PARAMS
            if name == "long" and abort_long:
                stream = engine.stream(list(prompt), params, deadline, request_id=name)
                long_events.extend([event async for event in stream])
                return
            results[name] = await engine.generate(list(prompt), params, deadline, request_id=name)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                if talker:
                    group.start_soon(run, "talker", SHORT, None)
                    while engine.stats().iterations == 0:  # its prompt: it decodes now
                        await anyio.sleep(0.001)
                group.start_soon(run, "long", LONG, long_deadline)
                busy = 1 + talker
                while engine.stats().running < busy or engine.stats().iterations < after_iterations:
                    await anyio.sleep(0.002)
                group.start_soon(run, "short", short_prompt, short_deadline)
                if abort_long:
                    while engine.stats().pauses == 0:
                        await anyio.sleep(0.002)
                    await engine.abort("long")
            while (stats := engine.stats()).running or stats.waiting:
                await anyio.sleep(0.01)
        order = [
            (record.step_id, ",".join(sorted({rid for rid, _, _ in record.tokens})))
            for record in engine.iteration_history
        ]
        return Played(results, order, stats.pauses, stats, long_events)


async def test_a_short_request_ahead_of_a_long_iteration_pauses_it(
    slow_long_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    observed: list[int] = []
    observe = OnlineTimeScale.observe_batch

    def spy(self: OnlineTimeScale, seqs: Any, *args: Any, **kwargs: Any) -> Any:
        observed.append(len(seqs))
        return observe(self, seqs, *args, **kwargs)

    monkeypatch.setattr(OnlineTimeScale, "observe_batch", spy)
    played = await _long_then_short(short_deadline=0.05)
    assert played.pauses == 1
    # The paused iteration ran as two batches: its time says nothing of the predicted one.
    assert len(observed) == played.stats.iterations - 1
    # The short's prompt ran while the long prompt's first iteration waited; its decodes come
    # after (a decode never keeps an iteration paused).
    assert played.order[0][1] == "short" and played.order[0][0] > 0
    assert played.order[1] == (0, "long")
    assert played.short.token_ids == greedy_alone(SHORT, PARAMS.max_tokens)
    assert played.long.token_ids == greedy_alone(LONG, PARAMS.max_tokens)
    assert played.stats.free_blocks == played.stats.total_blocks


async def test_a_short_request_that_overtakes_later_pauses_the_iteration(
    slow_long_chunks: None,
) -> None:
    # At arrival (after the long prompt's first iteration, ~0.8 s) the long prompt's relative
    # slack, (2 s - 0.8 s) / 2 s, is below the short's, 1; the short's falls 5x faster and
    # overtakes ~0.2 s later, while the long prompt's second iteration is in its first layer.
    # The time scale stays put: learning that layers sleep would reprice the long prompt.
    played = await _long_then_short(
        short_deadline=0.4, long_deadline=2.0, after_iterations=1, online_time_scale=False
    )
    assert played.pauses == 1
    assert played.order[0] == (0, "long")
    assert played.order[1][1] == "short" and played.order[1][0] > 1
    assert (1, "long") in played.order[2:]
    assert played.short.token_ids == greedy_alone(SHORT, PARAMS.max_tokens)
    assert played.long.token_ids == greedy_alone(LONG, PARAMS.max_tokens)


@pytest.mark.parametrize(
    "settings", [{"policy": "fcfs"}, {"policy": "fcfs-chunked"}, {"pause_iterations": False}]
)
async def test_no_pause_under_fcfs_or_with_pausing_off(
    slow_long_chunks: None, settings: dict[str, Any]
) -> None:
    played = await _long_then_short(short_deadline=0.05, **settings)
    assert played.pauses == 0
    steps = [step_id for step_id, _ in played.order]
    assert steps == sorted(steps)  # every iteration ran through, in order
    assert played.order[0] == (0, "long")
    assert played.short.token_ids == greedy_alone(SHORT, PARAMS.max_tokens)


async def test_aborting_the_paused_request_frees_its_blocks(slow_long_chunks: None) -> None:
    # A slow short prompt: the long iteration stays paused ~0.8 s, and the abort lands then.
    played = await _long_then_short(short_deadline=0.05, abort_long=True, short_prompt=SLOW_SHORT)
    assert played.pauses == 1
    # One event, the abort's, with no token: the paused step it was in sampled nothing for it.
    events = [(e.finish_reason, e.token_id, e.text) for e in played.long_events]
    assert events == [("abort", None, "")]
    assert played.short.token_ids == greedy_alone(SLOW_SHORT, PARAMS.max_tokens)
    assert played.stats.aborted == 1
    assert played.stats.free_blocks == played.stats.total_blocks


async def test_a_paused_iterations_decodes_finish_at_once_and_go_on_decoding(
    slow_long_chunks: None,
) -> None:
    played = await _long_then_short(short_deadline=0.05, talker=True)
    assert played.pauses == 1
    paused_at = next(i for i, (_, ids) in enumerate(played.order) if "long" in ids)
    paused_id, paused_ids = played.order[paused_at]
    assert paused_ids == "long,talker"  # the talker's decode shared the paused iteration
    # ...and it decoded again, beside the short's prompt, while that iteration waited.
    assert any(
        "talker" in ids and "short" in ids and step_id > paused_id
        for step_id, ids in played.order[:paused_at]
    )
    talker = played.results["talker"]
    assert talker.token_ids == greedy_alone(SHORT, TALKER_PARAMS.max_tokens)
    assert played.short.token_ids == greedy_alone(SHORT, PARAMS.max_tokens)
    assert played.long.token_ids == greedy_alone(LONG, PARAMS.max_tokens)


async def test_closing_the_engine_while_an_iteration_is_paused_ends_every_stream(
    slow_long_chunks: None,
) -> None:
    outcomes: dict[str, BaseException | medha.Completion] = {}
    with anyio.fail_after(30):
        async with medha.Engine(engine_config(max_chunk=512)) as engine:

            async def run(name: str, prompt: tuple[int, ...], deadline: float | None) -> None:
                try:
                    outcomes[name] = await engine.generate(list(prompt), PARAMS, deadline)
                except medha.EngineClosedError as exc:
                    outcomes[name] = exc

            async with anyio.create_task_group() as group:
                group.start_soon(run, "long", LONG, None)
                while engine.stats().running == 0:
                    await anyio.sleep(0.002)
                group.start_soon(run, "short", SLOW_SHORT, 0.05)
                while engine.stats().pauses == 0:
                    await anyio.sleep(0.002)
                await engine.stop()  # the short's prefill is running; the long one waits
    assert isinstance(outcomes["long"], medha.EngineClosedError)
    assert isinstance(outcomes["short"], medha.EngineClosedError)


async def test_a_decode_finished_as_its_iteration_paused_keeps_its_place_in_its_grammar(
    slow_long_chunks: None,
) -> None:
    # The talker's decode in the paused iteration is sampled at the pause, under the mask sent
    # with the iteration; its next decodes, beside the short's prompt, under masks made after.
    grammar = StructuredOutputsParams(regex="[a-z]+( [a-z]+)*")
    params = SamplingParams(
        max_tokens=TALKER_PARAMS.max_tokens, temperature=0.0, structured_outputs=grammar
    )
    played = await _long_then_short(short_deadline=0.05, talker=True, talker_params=params)
    assert played.pauses == 1
    paused_at = next(i for i, (_, ids) in enumerate(played.order) if "long" in ids)
    assert played.order[paused_at][1] == "long,talker"
    talker = played.results["talker"]
    assert talker.token_ids == greedy_under_grammar(SHORT, grammar, params.max_tokens or 0)
    assert len(talker.token_ids) > paused_at + 1  # it decoded past the pause
    assert played.short.token_ids == greedy_alone(SHORT, PARAMS.max_tokens)


async def test_an_abort_during_a_requests_last_iteration_lets_it_end_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As with pausing off (and vLLM): an abort that arrives while the iteration that ends a
    request runs is too late; the request ends by its length with that iteration's token."""
    forward = DecoderLayer.forward

    def slow_decodes(self: DecoderLayer, x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] == 1:  # the decode that samples the last token: the abort lands in it
            time.sleep(0.1)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", slow_decodes)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config(pause_iterations=True)) as engine:
        events = []
        async for event in engine.stream(list(SHORT), params, request_id="r"):
            events.append(event)
            if len(events) == 1:
                await engine.abort("r")
        stats = engine.stats()
    assert [(e.token_id is not None, e.finish_reason) for e in events] == [
        (True, None),
        (True, "length"),
    ]
    assert stats.free_blocks == stats.total_blocks and (stats.finished, stats.aborted) == (1, 0)


async def test_a_request_held_behind_an_abort_ends_when_delivering_the_step_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request reusing an aborted id waits while the step runs; if handing out that step's
    tokens fails (a bug), it must fail with the engine rather than wait forever."""
    from medha.actors.scheduler_actor import SchedulerActor

    forward, deliver = DecoderLayer.forward, SchedulerActor._deliver
    failing = False

    def slow_decodes(self: DecoderLayer, x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] == 1:
            time.sleep(0.1)
        return forward(self, x, *args, **kwargs)

    def broken(self: SchedulerActor, *args: Any) -> Any:
        if failing:
            raise RuntimeError("a bug in delivery")
        return deliver(self, *args)

    monkeypatch.setattr(DecoderLayer, "forward", slow_decodes)
    monkeypatch.setattr(SchedulerActor, "_deliver", broken)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config(pause_iterations=True)) as engine:
        first = engine.stream(list(SHORT), params, request_id="r")
        await first.__anext__()  # the next step, a slow decode, runs now
        await first.aclose()  # its abort waits for that step
        second = engine.stream([5, 6, 7, 8], params, request_id="r")  # waits behind it
        failing = True
        with anyio.fail_after(10), pytest.raises(medha.EngineFailedError):
            async for _ in second:
                pass
