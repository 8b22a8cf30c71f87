"""The engine under load: LARS interleaving keeps greedy outputs exact, cancellations never leak
KV blocks, short requests overtake a long prefill under LARS (not under FCFS), and a KV cache a
quarter of the workload's size still completes everything through preemption by recompute."""

from __future__ import annotations

import random

import anyio
import pytest

import medha
from medha import SamplingParams
from tests.engine_support import engine_config, greedy_alone, run_all_greedy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _workload(seed: int, count: int, max_prompt: int) -> list[tuple[tuple[int, ...], int]]:
    rng = random.Random(seed)
    return [
        (tuple(rng.randrange(512) for _ in range(rng.randint(3, max_prompt))), rng.randint(2, 16))
        for _ in range(count)
    ]


async def test_greedy_outputs_under_heavy_lars_interleaving_equal_each_request_alone() -> None:
    work = _workload(seed=3, count=14, max_prompt=700)
    # A tiny time budget forces small chunks: prompts are split and batched with others.
    config = engine_config(policy="lars", target_batch_time=0.002)
    async with medha.Engine(config, record_iterations=True) as engine:
        outputs = await run_all_greedy(engine, work, stagger=0.003)
        history = engine.iteration_history
    for (prompt, max_tokens), tokens in zip(work, outputs, strict=True):
        assert tokens == greedy_alone(prompt, max_tokens)
    chunks_per_request: dict[str, int] = {}
    for record in history:
        for request_id, _, is_prefill in record.tokens:
            if is_prefill:
                chunks_per_request[request_id] = chunks_per_request.get(request_id, 0) + 1
    assert max(chunks_per_request.values()) >= 3, "no prompt was split into chunks"
    assert any(len(r.tokens) >= 3 for r in history), "requests were never batched together"


async def test_200_concurrent_requests_with_random_cancellations_leave_every_block_free() -> None:
    rng = random.Random(7)
    completed, cancelled = 0, 0
    async with medha.Engine(engine_config(num_blocks=400, target_batch_time=0.005)) as engine:

        async def one(i: int) -> None:
            nonlocal completed, cancelled
            prompt = [rng.randrange(512) for _ in range(rng.randint(1, 120))]
            params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0)
            action = rng.choice(["finish", "break", "cancel", "abort"])
            await anyio.sleep(rng.random() * 0.2)
            if action == "finish":
                await engine.generate(prompt, params)
                completed += 1
            elif action == "break":
                async for _ in engine.stream(prompt, params):
                    break
                cancelled += 1
            elif action == "cancel":
                with anyio.move_on_after(rng.random() * 0.3):
                    await engine.generate(prompt, params)
                cancelled += 1
            else:
                stream = engine.stream(prompt, params, request_id=f"r{i}")
                async for _ in stream:
                    await engine.abort(f"r{i}")
                cancelled += 1

        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for i in range(200):
                    group.start_soon(one, i)
            while (stats := engine.stats()).running or stats.waiting or stats.preempted:
                await anyio.sleep(0.01)
    assert completed + cancelled == 200 and completed > 20 and cancelled > 60
    assert stats.free_blocks == stats.total_blocks


async def _first_token_while_long_prefills(policy: str) -> tuple[int, int, int]:
    """(long prompt tokens processed up to the iteration of the short's first token included,
    long prompt length, iterations between the short's arrival and its first token)."""
    long_prompt = [random.Random(1).randrange(512) for _ in range(3000)]
    config = engine_config(policy=policy, target_batch_time=0.002, fixed_chunk=128)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async with medha.Engine(config, record_iterations=True) as engine:
        async with anyio.create_task_group() as group:
            # A loose deadline: with the engine's default (its predicted prefill time, at least
            # 0.5 s), a machine slower than its calibration leaves the long request less slack
            # than the short one, and LARS then rightly serves the long request first.
            group.start_soon(engine.generate, long_prompt, params, 30.0)
            # Arrive once the long prefill is under way (or, for fcfs, already queued).
            while engine.stats().running == 0:
                await anyio.sleep(0)
            arrival_iteration = engine.stats().iterations
            short = await engine.generate([1, 2, 3, 4], params, 0.05, request_id="short")
        history = engine.iteration_history
    assert short.token_ids
    long_done = 0
    for index, record in enumerate(history):
        long_done += sum(q for rid, q, prefill in record.tokens if rid != "short" and prefill)
        if any(request_id == "short" for request_id, _, _ in record.tokens):
            return long_done, len(long_prompt), index + 1 - arrival_iteration
    raise AssertionError("the short request never ran")


async def test_under_lars_a_short_request_overtakes_a_running_long_prefill() -> None:
    long_done, long_len, waited = await _first_token_while_long_prefills("lars")
    assert long_done < long_len, "the short request waited for the whole long prefill"
    assert waited <= 8


@pytest.mark.parametrize("policy", ["fcfs", "fcfs-chunked"])
async def test_under_fcfs_a_short_request_waits_for_the_whole_long_prefill(policy: str) -> None:
    long_done, long_len, waited = await _first_token_while_long_prefills(policy)
    assert long_done == long_len
    if policy == "fcfs-chunked":
        assert waited > 8  # the convoy, counted in iterations


async def test_kv_cache_a_quarter_of_the_workload_completes_through_preemption() -> None:
    work = _workload(seed=11, count=12, max_prompt=150)
    work = [(prompt, 40) for prompt, _ in work]
    needed_blocks = sum(-(-(len(p) + m) // 16) for p, m in work)
    largest = max(-(-(len(p) + m) // 16) for p, m in work)
    quarter = max(needed_blocks // 4, largest)
    async with medha.Engine(engine_config(num_blocks=1024)) as engine:
        unconstrained = await run_all_greedy(engine, work)
    async with medha.Engine(engine_config(num_blocks=quarter, target_batch_time=0.003)) as engine:
        constrained = await run_all_greedy(engine, work)
        stats = engine.stats()
    assert stats.preemptions > 0, "the small cache never forced a preemption"
    assert constrained == unconstrained
    assert stats.free_blocks == stats.total_blocks == quarter


@pytest.mark.parametrize("tolerance", [0.0, 0.4])
async def test_the_engine_plans_with_the_configured_finish_tolerance(tolerance: float) -> None:
    async with medha.Engine(engine_config(finish_tolerance=tolerance)) as engine:
        assert engine._scheduler_actor is not None
        assert engine._scheduler_actor.scheduler.config.finish_tolerance == tolerance
