"""The discrete-event simulator: the real Scheduler, a cost-model executor, a simulated clock.

Events are request arrivals, "plan left stage 0" and "plan finished". After the events of an
instant are handled, every replica they touched whose stage 0 is free (and whose pipeline has
fewer than pp plans in flight) asks its Scheduler for the next plan; the executor
(replica.PipelineExecutor) says when that plan leaves stage 0 (`on_stage0_done`: with SPP the
next chunk of the same prompt may enter) and when it finishes (`on_step_done`: tokens sampled).
Nothing else advances the clock, so idle gaps cost nothing and a run's speed depends only on
the number of iterations.

Several replicas (each with its own Scheduler) share one clock; a router assigns each arrival
to one: round-robin, or least-loaded (fewest prompt + output tokens routed to it and not yet
finished).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from medha.errors import InvalidRequestError, MedhaError
from medha.scheduler import BatchPlan, Scheduler, SchedulerConfig, SchedulerStats, SeqKind
from medha.scheduler.cost import BatchCostModel
from medha.sim.metrics import MetricsSummary, RequestRecord, summarize
from medha.sim.replica import PipelineExecutor, plan_times
from medha.sim.workload import SimRequest

Routing = Literal["round-robin", "least-loaded"]
ROUTINGS: tuple[Routing, ...] = ("round-robin", "least-loaded")

LONG_PROMPT_TOKENS = 32_768
"""Default prompt length from which a request's chunks are recorded (for chunk-size plots)."""

_STAGE0, _DONE = 0, 1


class SimulationError(MedhaError):
    """The simulation cannot finish (a scheduler stalled with work left)."""


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One prefill chunk of a long request, as issued."""

    time: float
    request_id: str
    start: int
    """Tokens of the prompt already issued before this chunk."""
    tokens: int


@dataclass
class SimResult:
    """Everything one run produced."""

    records: list[RequestRecord]
    """Finished requests, in finishing order."""
    rejected: dict[str, str]
    """Requests the scheduler refused (id -> reason), e.g. too large for the KV cache."""
    chunks: list[ChunkRecord]
    end_time: float
    """Simulated seconds until the last request finished."""
    plans: int
    """Micro-batches issued over all replicas."""
    wall_seconds: float
    """Real seconds the run took."""
    stage0_busy_seconds: list[float]
    """Per replica, simulated seconds its first pipeline stage was occupied."""
    final_stats: list[SchedulerStats] = field(default_factory=list)
    rejected_labels: dict[str, str] = field(default_factory=dict)
    """The workload label of each rejected request (id -> label)."""

    def rejected_count(self, label: str | None = None) -> int:
        """Requests refused: all, or those with `label`."""
        if label is None:
            return len(self.rejected)
        return sum(1 for found in self.rejected_labels.values() if found == label)

    @property
    def labels(self) -> list[str]:
        """The workload labels of the requests given, finished or rejected."""
        return sorted({record.label for record in self.records} | {*self.rejected_labels.values()})

    def summary(self, label: str | None = None) -> MetricsSummary:
        """Statistics over all finished requests, or over those with `label`."""
        return summarize(r for r in self.records if label is None or r.label == label)


@dataclass
class _Replica:
    scheduler: Scheduler
    executor: PipelineExecutor
    in_flight: int = 0
    stage0_busy: bool = False
    outstanding_tokens: int = 0


class Simulator:
    """Runs workloads through `num_replicas` Schedulers built from `config` and `cost`.

    `executor_cost`: the cost model that decides how long plans really take (default: the
    scheduler's own `cost`, so every prediction is exact). `trace_chunks_from`: prompts of at
    least this many tokens have each prefill chunk recorded in `SimResult.chunks`.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        cost: BatchCostModel,
        *,
        num_replicas: int = 1,
        routing: Routing = "round-robin",
        executor_cost: BatchCostModel | None = None,
        trace_chunks_from: int = LONG_PROMPT_TOKENS,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r} (choose from {', '.join(ROUTINGS)})")
        self.config = config
        self.cost = cost
        self.num_replicas = num_replicas
        self.routing = routing
        self.executor_cost = executor_cost
        self.trace_chunks_from = trace_chunks_from

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        """Simulate `requests` (any order; ids must be unique) until every one finished."""
        started = time.perf_counter()
        run = _Run(self, requests)
        run.loop()
        return SimResult(
            records=run.records,
            rejected=run.rejected,
            rejected_labels=run.rejected_labels,
            chunks=run.chunks,
            end_time=run.now,
            plans=run.plans,
            wall_seconds=time.perf_counter() - started,
            stage0_busy_seconds=[replica.executor.busy_time for replica in run.replicas],
            final_stats=[replica.scheduler.stats() for replica in run.replicas],
        )


class _Run:
    """The state of one simulation run."""

    def __init__(self, sim: Simulator, requests: Sequence[SimRequest]) -> None:
        self.sim = sim
        self.arrivals = sorted(requests, key=lambda r: (r.arrival, r.request_id))
        ids = {r.request_id for r in self.arrivals}
        if len(ids) != len(self.arrivals):
            raise ValueError("request ids must be unique")
        self.by_id = {r.request_id: r for r in self.arrivals}
        self.traced = {
            r.request_id for r in self.arrivals if r.prompt_tokens >= sim.trace_chunks_from
        }
        self.replicas = [
            _Replica(Scheduler(sim.config, sim.cost), PipelineExecutor(sim.config.pp_stages))
            for _ in range(sim.num_replicas)
        ]
        self.replica_of: dict[str, int] = {}
        self.events: list[tuple[float, int, int, int, BatchPlan]] = []
        self.counter = itertools.count()
        self.next_arrival = 0
        self.now = 0.0
        self.records: list[RequestRecord] = []
        self.rejected: dict[str, str] = {}
        self.rejected_labels: dict[str, str] = {}
        self.chunks: list[ChunkRecord] = []
        self.plans = 0

    def loop(self) -> None:
        arrivals, events = self.arrivals, self.events
        while True:
            arrival_time = (
                arrivals[self.next_arrival].arrival if self.next_arrival < len(arrivals) else None
            )
            if events and (arrival_time is None or events[0][0] <= arrival_time):
                self.now = events[0][0]
            elif arrival_time is not None:
                self.now = arrival_time
            else:
                break
            touched: set[int] = set()
            while (
                self.next_arrival < len(arrivals)
                and arrivals[self.next_arrival].arrival <= self.now
            ):
                touched.add(self._arrive(arrivals[self.next_arrival]))
                self.next_arrival += 1
            while events and events[0][0] <= self.now:
                _, _, kind, index, plan = heapq.heappop(events)
                self._complete(kind, self.replicas[index], plan)
                touched.add(index)
            for index in sorted(touched):
                self._issue(index)
        for index, replica in enumerate(self.replicas):
            if replica.scheduler.has_work:
                raise SimulationError(
                    f"replica {index} stalled at t={self.now:.3f} s with work left and nothing "
                    f"in flight: {replica.scheduler.stats()}"
                )

    def _arrive(self, request: SimRequest) -> int:
        index = self._route(request)
        replica = self.replicas[index]
        try:
            replica.scheduler.add_request(
                request.request_id,
                request.prompt_tokens,
                request.output_tokens,
                request.arrival,
                request.deadline,
            )
        except InvalidRequestError as exc:
            self.rejected[request.request_id] = str(exc)
            self.rejected_labels[request.request_id] = request.label
            return index
        self.replica_of[request.request_id] = index
        replica.outstanding_tokens += request.prompt_tokens + request.output_tokens
        return index

    def _route(self, request: SimRequest) -> int:
        if self.sim.num_replicas == 1:
            return 0
        if self.sim.routing == "round-robin":
            return self.next_arrival % self.sim.num_replicas
        loads = [replica.outstanding_tokens for replica in self.replicas]
        return loads.index(min(loads))

    def _issue(self, index: int) -> None:
        replica = self.replicas[index]
        if replica.stage0_busy or replica.in_flight >= self.sim.config.pp_stages:
            return
        plan = replica.scheduler.schedule(self.now)
        if plan.is_empty:
            return
        if self.sim.executor_cost is None:
            stage_time, batch_time = plan.predicted_stage_time, plan.predicted_time
        else:
            stage_time, batch_time = plan_times(plan, self.sim.executor_cost)
        stage0_at, done_at = replica.executor.issue(self.now, stage_time, batch_time)
        heapq.heappush(self.events, (stage0_at, next(self.counter), _STAGE0, index, plan))
        heapq.heappush(self.events, (done_at, next(self.counter), _DONE, index, plan))
        replica.in_flight += 1
        replica.stage0_busy = True
        self.plans += 1
        if self.traced:
            self.chunks.extend(
                ChunkRecord(self.now, seq.request_id, seq.start, seq.q_tokens)
                for seq in plan.seqs
                if seq.kind is SeqKind.PREFILL and seq.request_id in self.traced
            )

    def _complete(self, kind: int, replica: _Replica, plan: BatchPlan) -> None:
        if kind == _STAGE0:
            replica.scheduler.on_stage0_done(plan)
            replica.stage0_busy = False
            return
        replica.in_flight -= 1
        for done in replica.scheduler.on_step_done(plan, self.now):
            request = self.by_id[done.request_id]
            replica.outstanding_tokens -= request.prompt_tokens + request.output_tokens
            assert done.first_token_time is not None and done.finish_time is not None
            self.records.append(
                RequestRecord(
                    request_id=done.request_id,
                    label=request.label,
                    replica=self.replica_of[done.request_id],
                    arrival=done.arrival,
                    prompt_tokens=done.prompt_len,
                    output_tokens=done.generated,
                    deadline=done.deadline,
                    first_token_time=done.first_token_time,
                    finish_time=done.finish_time,
                    preemptions=done.num_preemptions,
                )
            )
