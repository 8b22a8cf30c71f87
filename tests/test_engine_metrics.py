"""Engine.metrics: the engine's Prometheus metrics count every request, token and iteration
once, whatever ends the request, and read the gauges from Engine.stats()."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
import weakref
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import medha
from medha import SamplingParams, engine_stats
from medha.actors.scheduler_actor import SchedulerActor
from medha.engine_metrics import RATIO_CAP, EngineMetrics
from medha.engine_stats import EngineStats
from medha.request import RequestMetrics
from tests.engine_support import engine_config, idle, tracked_request
from tests.server_support import openai_client

pytestmark = pytest.mark.anyio

MODEL = "tiny-random"


def value(metrics: EngineMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": metrics.model_name, **labels})


def finished(metrics: EngineMetrics, reason: str) -> float | None:
    return value(metrics, "medha:request_success_total", finished_reason=reason)


def deadlines(metrics: EngineMetrics, outcome: str) -> float | None:
    return value(metrics, "medha:first_token_deadline_total", outcome=outcome)


async def test_finished_requests_count_their_tokens_latencies_and_iterations() -> None:
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    lengths = [5, 3, 1]
    async with medha.Engine(engine_config(), model_name="served") as engine:
        metrics = engine.metrics
        assert metrics.model_name == "served"
        done: list[medha.Completion] = []

        async def generate(prompt: list[int], length: int) -> None:
            params = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
            done.append(await engine.generate(prompt, params, 30.0))

        async with anyio.create_task_group() as group:
            for prompt, length in zip(prompts, lengths, strict=True):
                group.start_soon(generate, prompt, length)
        stats = await idle(engine)
        runs = [c.metrics for c in done]
        gaps = [b - a for m in runs for a, b in itertools.pairwise(m.token_times)]
        assert value(metrics, "medha:inter_token_latency_seconds_sum") == pytest.approx(sum(gaps))
        ttfts = sum(m.ttft or 0 for m in runs)
        assert value(metrics, "medha:time_to_first_token_seconds_sum") == pytest.approx(ttfts)
        e2e = sum(m.e2e or 0 for m in runs)
        assert value(metrics, "medha:e2e_request_latency_seconds_sum") == pytest.approx(e2e)
        ratios = sum((m.ttft or 0) / m.deadline for m in runs)
        assert value(metrics, "medha:first_token_deadline_ratio_sum") == pytest.approx(ratios)
        assert finished(metrics, "length") == 3
        assert finished(metrics, "stop") == finished(metrics, "abort") == 0
        assert finished(metrics, "error") == 0
        assert value(metrics, "medha:generation_tokens_total") == sum(lengths)
        assert value(metrics, "medha:prompt_tokens_total") == 12
        assert value(metrics, "medha:prefill_tokens_computed_total") == 12
        assert value(metrics, "medha:time_to_first_token_seconds_count") == 3
        assert deadlines(metrics, "met") == 3 and deadlines(metrics, "missed") == 0
        assert value(metrics, "medha:first_token_deadline_ratio_bucket", le="1.0") == 3
        # Every token after a request's first is one inter-token latency.
        assert value(metrics, "medha:inter_token_latency_seconds_count") == sum(lengths) - 3
        # A one-token request has no time per output token.
        assert value(metrics, "medha:request_time_per_output_token_seconds_count") == 2
        assert value(metrics, "medha:e2e_request_latency_seconds_count") == 3
        assert value(metrics, "medha:request_prompt_tokens_sum") == 12
        assert value(metrics, "medha:request_generation_tokens_sum") == sum(lengths)
        assert value(metrics, "medha:request_generation_tokens_bucket", le="1.0") == 1
        assert value(metrics, "medha:iteration_seconds_count") == stats.iterations
        assert value(metrics, "medha:iteration_tokens_sum") == 12 + sum(lengths) - 3
        assert value(metrics, "medha:iteration_time_prediction_ratio_count") == stats.iterations
        assert value(metrics, "medha:kv_cache_usage_perc") == 0.0
        assert value(metrics, "medha:kv_cache_total_blocks") == stats.total_blocks


async def test_the_gauges_are_the_stats_of_the_moment() -> None:
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        stream = engine.stream([1, 2, 3] * 20, params)
        never_iterated = engine.stream([4, 5, 6], params)
        async for _ in stream:
            # No await between the two: both see the same moment.
            stats, text = engine.stats(), engine.metrics.render().decode()
            break
        await stream.aclose()
        await never_iterated.aclose()
        gauges = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert stats.running == 1 and gauges["medha:num_requests_running"] == 1
        assert gauges["medha:num_requests_waiting"] == stats.waiting
        used = 1 - stats.free_blocks / stats.total_blocks
        assert gauges["medha:kv_cache_usage_perc"] == pytest.approx(used)
        assert used > 0
        # A stream never iterated was never submitted: only the first one counts.
        await idle(engine)
        assert finished(engine.metrics, "abort") == 1


async def test_an_abort_and_a_stopped_engine_count_once_with_their_reason() -> None:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    engine = medha.Engine(engine_config())
    async with engine:
        metrics = engine.metrics
        async for _ in engine.stream([1, 2, 3], params, request_id="left"):
            break  # leaving the loop aborts it
        running = engine.stream([4, 5, 6], params, request_id="running")
        await running.__anext__()
        with anyio.fail_after(5):  # the abandoned stream is closed on the loop, then aborts
            while finished(metrics, "abort") == 0:
                await anyio.sleep(0.005)
        await engine.abort("left")  # already ended: nothing more to count
        await anyio.sleep(0.05)
        assert finished(metrics, "abort") == 1
        assert value(metrics, "medha:e2e_request_latency_seconds_count") == 1
    # Stopping the engine ends the running request with an error.
    with pytest.raises(medha.EngineClosedError):
        async for _ in running:
            pass
    assert finished(metrics, "error") == 1
    assert finished(metrics, "abort") == 1
    assert value(metrics, "medha:e2e_request_latency_seconds_count") == 2
    # A stopped engine's metrics still render, without the gauges of a running one.
    families = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    assert "medha:request_success" in families
    assert "medha:num_requests_running" not in families


async def test_a_first_token_after_its_deadline_is_a_miss() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        completion = await engine.generate([1, 2, 3], params, deadline=1e-9)
        assert completion.metrics.deadline_met is False
        metrics = engine.metrics
        assert deadlines(metrics, "missed") == 1 and deadlines(metrics, "met") == 0
        assert value(metrics, "medha:first_token_deadline_ratio_bucket", le="10.0") == 0


def _metrics_of(arrival: float, deadline: float, finished_time: float) -> RequestMetrics:
    metrics = RequestMetrics(arrival=arrival, deadline=deadline)
    metrics.finished_time = finished_time
    return metrics


def test_a_request_ended_without_a_first_token_misses_only_a_passed_deadline() -> None:
    metrics = EngineMetrics(MODEL, lambda: None)
    metrics.request_ended(_metrics_of(1.0, 0.5, 1.4), "abort", 10)
    assert deadlines(metrics, "missed") == 0
    metrics.request_ended(_metrics_of(1.0, 0.5, 1.6), "error", 10)
    assert deadlines(metrics, "missed") == 1
    # Deadline 0: none was set (refused before the scheduler set the default one).
    metrics.request_ended(_metrics_of(1.0, 0.0, 9.0), "error", 10)
    assert deadlines(metrics, "missed") == 1
    assert finished(metrics, "abort") == 1 and finished(metrics, "error") == 2
    assert value(metrics, "medha:request_generation_tokens_bucket", le="1.0") == 3


def test_a_parked_request_failing_keeps_its_own_deadline() -> None:
    """Parked: its id is still the previous request's in the scheduler (a pipeline)."""

    class Previous:
        deadline = 123.0

    scheduler = SimpleNamespace(get=lambda request_id: Previous())
    actor = SchedulerActor(scheduler, None, lambda: 2.0)  # type: ignore[arg-type]
    parked = tracked_request([1, 2, 3], SamplingParams.greedy(2))
    actor._parked.append(parked)
    actor._fail_requests(medha.EngineClosedError("closed"), None)
    assert parked.metrics.deadline == 1.0 and parked.finish_reason == "abort"


def test_each_engine_has_a_registry_of_its_own_which_does_not_keep_it_alive() -> None:
    first, second = medha.Engine(engine_config()), medha.Engine(engine_config())
    assert first.metrics.registry is not second.metrics.registry
    # Not started: counters and histograms only.
    names = {f.name for f in first.metrics.registry.collect()}
    assert "medha:time_to_first_token_seconds" in names
    assert "medha:num_requests_running" not in names
    # It can be served with another registry's metrics.
    service = CollectorRegistry()
    service.register(first.metrics.registry)
    assert service.get_sample_value("medha:request_success_total", {
        "model_name": MODEL, "finished_reason": "stop"
    }) == 0  # fmt: skip
    metrics, gone = second.metrics, weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None
    assert "medha:num_requests_running" not in {f.name for f in metrics.registry.collect()}


def test_the_gauges_follow_the_stats() -> None:
    stats = EngineStats(
        free_blocks=30,
        total_blocks=40,
        waiting=2,
        running=3,
        preempted=1,
        finished=9,
        aborted=0,
        preemptions=4,
        iterations=50,
        time_scale=1.25,
        pauses=6,
        cached_blocks=7,
        prefix_cache_hit_tokens=112,
    )
    metrics = EngineMetrics(MODEL, lambda: stats)
    expected = {
        "medha:num_requests_running": 3,
        "medha:num_requests_waiting": 2,
        "medha:num_requests_preempted": 1,
        "medha:kv_cache_usage_perc": 0.25,
        "medha:kv_cache_total_blocks": 40,
        "medha:prefix_cache_blocks": 7,
        "medha:cost_time_scale": 1.25,
        "medha:num_preemptions_total": 4,
        "medha:iteration_pauses_total": 6,
        "medha:prefix_cache_hit_tokens_total": 112,
    }
    assert {name: value(metrics, name) for name in expected} == expected
    # An absurd deadline (5e-324 s is a valid one) is counted, capped: the sum stays finite.
    for deadline in (5e-324, 0.0):
        request = RequestMetrics(arrival=0.0, deadline=deadline)
        request.record_token(0.5)
        metrics.token(request, 3)
    assert value(metrics, "medha:first_token_deadline_ratio_bucket", le="+Inf") == 2
    assert value(metrics, "medha:first_token_deadline_ratio_bucket", le="10.0") == 0
    assert value(metrics, "medha:first_token_deadline_ratio_sum") == 2 * RATIO_CAP


async def test_stats_from_another_thread_are_taken_on_the_engines_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[int] = []
    of = EngineStats.of

    def recording(actor: Any) -> EngineStats:
        threads.append(threading.get_ident())
        return of(actor)

    monkeypatch.setattr(EngineStats, "of", recording)
    async with medha.Engine(engine_config()) as engine:
        loop_thread = threading.get_ident()
        stats = await anyio.to_thread.run_sync(engine.stats)
        text = await anyio.to_thread.run_sync(engine.metrics.render)
        assert threads == [loop_thread, loop_thread]
        assert stats.total_blocks == engine.stats().total_blocks
        assert b"medha:num_requests_running{" in text
        # A loop too busy to answer in time: the scrape goes on without the gauges.
        monkeypatch.setattr(engine_stats, "CROSS_THREAD_TIMEOUT_S", 0.05)
        scraped: list[bytes] = []
        taken = len(threads)
        scrape = threading.Thread(target=lambda: scraped.append(engine.metrics.render()))
        scrape.start()
        time.sleep(0.5)  # the loop's thread, blocked
        scrape.join(5)
        assert b"medha:request_success_total{" in scraped[0]
        assert b"medha:num_requests_running{" not in scraped[0]
        await anyio.sleep(0.05)  # the loop reaches the scrape's callback: given up, it is skipped
        assert len(threads) == taken


def test_stats_of_an_engine_whose_loop_is_not_running_are_taken_at_once() -> None:
    loop = asyncio.new_event_loop()
    engine = medha.Engine(engine_config())
    loop.run_until_complete(engine.start())
    try:
        started = time.monotonic()
        assert engine.stats().total_blocks == 1024  # on the loop's thread, between runs
        scrape: list[bytes] = []
        thread = threading.Thread(target=lambda: scrape.append(engine.metrics.render()))
        thread.start()
        thread.join(10)
        assert time.monotonic() - started < 2  # not CROSS_THREAD_TIMEOUT_S
        assert b"medha:num_requests_running{" in scrape[0]
    finally:
        loop.run_until_complete(engine.stop())
        loop.close()


async def test_a_request_ended_before_its_first_token_keeps_its_re_predicted_deadline() -> None:
    config = engine_config(policy="lars", online_time_scale=False, max_chunk=32)
    async with medha.Engine(config) as engine:
        scheduler = engine._actor().scheduler
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        stream = engine.stream([1, 2, 3] * 600, params, request_id="long")
        events = []

        async def consume() -> None:
            events.extend([event async for event in stream])

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            with anyio.fail_after(10):
                while scheduler.get("long") is None or scheduler.get("long").in_flight == 0:
                    await anyio.sleep(0.001)
            request = scheduler.get("long")
            before = request.deadline  # 1.5 x its predicted prefill (at least 0.5 s)
            scheduler.cost.time_scale = 1000.0  # type: ignore[attr-defined]
            # Re-priced at its next plan. Compared with what it was, not with a fixed number:
            # the prediction is as fast as the cost profile calibrated on this machine.
            with anyio.fail_after(10):
                while request.deadline == before:
                    assert scheduler.get("long") is request, "done before it was re-priced"
                    await anyio.sleep(0.001)
            repredicted = request.deadline
            assert repredicted > before
            await engine.abort("long")
        (last,) = events
        assert last.finish_reason == "abort" and last.metrics.first_token_time is None
        assert last.metrics.deadline == repredicted


async def test_with_metrics_off_there_are_none_and_no_metrics_route() -> None:
    async with medha.Engine(engine_config(enable_metrics=False)) as engine:
        assert engine.metrics is None
        done = await engine.generate([1, 2, 3], SamplingParams.greedy(3, ignore_eos=True))
        assert done.finish_reason == "length"
        assert engine._actor().metrics is None
        _, http = openai_client(engine)
        async with http:
            missing = await http.get("/metrics")
            assert missing.status_code == 404
            assert (await http.get("/stats")).status_code == 200
