"""Play a MixedRequest workload against a running Engine in real time and collect results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from medha.actors.scheduler_messages import IterationRecord
from medha.bench.mixed_workload import MixedRequest
from medha.engine import Engine
from medha.sampling import SamplingParams
from medha.sim.metrics import percentile


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    kind: str
    arrival: float
    """When the workload says it arrives (seconds after the run starts)."""
    submitted: float
    """When it was submitted, on the same clock: later than `arrival` when the event loop
    woke late. Its TTFT counts from here."""
    ttft: float
    tpot: float | None
    e2e: float
    output_tokens: int
    token_ids: tuple[int, ...]
    deadline_met: bool


async def run_workload(
    engine: Engine,
    workload: Sequence[MixedRequest],
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Submit each request at its arrival time (seconds after the call) and wait for all."""
    results: list[RequestResult] = []
    start = anyio.current_time()

    async def one(request: MixedRequest) -> None:
        await anyio.sleep_until(start + request.arrival)
        submitted = anyio.current_time() - start
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        done = await engine.generate(
            list(request.prompt_ids), params, request_id=request.request_id
        )
        m = done.metrics
        assert m.ttft is not None and m.e2e is not None
        result = RequestResult(
            request.request_id,
            request.kind,
            request.arrival,
            submitted,
            m.ttft,
            m.tpot,
            m.e2e,
            len(done.token_ids),
            tuple(done.token_ids),
            bool(m.deadline_met),
        )
        results.append(result)
        if on_done is not None:
            on_done(result)

    async with anyio.create_task_group() as group:
        for request in workload:
            group.start_soon(one, request)
    return sorted(results, key=lambda r: r.arrival)


def summarize(results: Sequence[RequestResult], wall_seconds: float) -> dict[str, float]:
    shorts = [r for r in results if r.kind == "short"]
    longs = [r for r in results if r.kind == "long"]
    tpots = [r.tpot for r in results if r.tpot is not None]
    return {
        "short_ttft_p50": percentile([r.ttft for r in shorts], 50),
        "short_ttft_p99": percentile([r.ttft for r in shorts], 99),
        "long_ttft": max((r.ttft for r in longs), default=float("nan")),
        "tpot_p50": percentile(tpots, 50),
        "tpot_p99": percentile(tpots, 99),
        "throughput_tok_s": sum(r.output_tokens for r in results) / wall_seconds,
        "short_deadlines_met": sum(r.deadline_met for r in shorts) / max(1, len(shorts)),
    }


def iteration_time_error(history: Sequence[IterationRecord]) -> float:
    """Median |predicted - measured| / measured over the iterations an engine ran: how well
    the calibrated cost model the scheduler plans with matches the executor on a live mix."""
    errors = [
        abs(record.predicted_seconds - record.seconds) / record.seconds
        for record in history
        if record.seconds > 0
    ]
    return percentile(errors, 50)
