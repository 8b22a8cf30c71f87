"""The scheduler actor of a multi-process engine: plans go to the workers by RPC, and several
micro-batches may be in the pipeline at once.

Differences from the single-process actor it extends (requests, abort and token delivery are the
same):
- a plan is issued whenever the Scheduler gives one: it refuses while stage 0 is busy or p plans
  are in flight, so issuing is the Scheduler's decision, not this loop's;
- "stage 0 done" comes back from every stage-0 worker: the Scheduler is told at once, and with
  SPP it may issue the next chunk of the same prompt while the previous one is still in the
  later stages;
- plans complete in issue order (a pipeline is FIFO); their sampled tokens come from the
  sampling worker;
- the online time scale compares a plan's predicted stage time with the longest any worker
  computed it (each worker times its step from holding its inputs, so waiting behind other
  micro-batches or for the previous stage does not count).
Worker replies arrive on RPC threads and are handed to the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from medha.actors.messages import StepOutput
from medha.actors.scheduler_actor import SchedulerActor
from medha.actors.scheduler_messages import Abort, Submit
from medha.engine_metrics import EngineMetrics
from medha.errors import EngineFailedError
from medha.log import get_logger
from medha.parallel.cluster import Cluster
from medha.parallel.messages import ShardStep, ShardWork, StageDone
from medha.parallel.placement import seq_works
from medha.perf.time_scale import OnlineTimeScale
from medha.scheduler import BatchPlan, Scheduler
from medha.scheduler.pausing import ran_alone

_log = get_logger(__name__)

# Safety net only: every reply and every message wakes the loop.
_MAX_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class WorkersFailed:
    """Told by the engine's supervisor when a worker process is gone."""

    error: BaseException


@dataclass(eq=False)
class _Flight:
    seq_no: int
    plan: BatchPlan | None
    issued_at: float
    stage0_left: set[int]
    left: set[int]
    stage0_reported: bool = False
    output: StepOutput | None = None
    logits: object | None = None
    done_at: float = field(default=0.0)
    compute_seconds: float = 0.0
    """The longest any worker computed this plan (its stage time as measured)."""
    level_at_issue: float = 1.0
    """The cost model's time_scale when the plan was predicted."""


class PipelineSchedulerActor(SchedulerActor):
    def __init__(
        self,
        scheduler: Scheduler,
        cluster: Cluster,
        clock: Callable[[], float],
        record_iterations: bool = False,
        time_scale: OnlineTimeScale | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        super().__init__(
            scheduler,
            None,  # type: ignore[arg-type]  # no stage actor: plans go to the cluster
            clock,
            record_iterations,
            time_scale,
            metrics=metrics,
        )
        self.cluster = cluster
        self.layout = cluster.layout
        self._flights: dict[int, _Flight] = {}
        self._order: deque[_Flight] = deque()
        self._next_seq = 0
        self._wake = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_plans_in_flight = 0
        self.record_logits = False
        """Exactness tests: keep each plan's sampling-row logits in `logits_log`."""
        self.logits_log: list[tuple[BatchPlan, object]] = []

    # -- waking the loop ------------------------------------------------------------------------

    def tell(self, message: Submit | Abort | WorkersFailed) -> None:  # type: ignore[override]
        super().tell(message)  # type: ignore[arg-type]
        self._wake.set()

    def _handle(self, message: Submit | Abort | WorkersFailed) -> None:  # type: ignore[override]
        if isinstance(message, WorkersFailed):
            raise EngineFailedError(f"a worker process failed: {message.error}") from message.error
        super()._handle(message)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await super().run()

    def _on_reply(self, rank: int, result: StageDone | BaseException) -> None:
        """Called on an RPC thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with _suppress_closed_loop():
            loop.call_soon_threadsafe(self._record_reply, rank, result)

    def _record_reply(self, rank: int, result: StageDone | BaseException) -> None:
        if isinstance(result, BaseException):
            self._reply_error = result
        else:
            flight = self._flights.get(result.seq_no)
            if flight is not None:
                flight.stage0_left.discard(rank)
                flight.left.discard(rank)
                flight.compute_seconds = max(flight.compute_seconds, result.seconds)
                if result.output is not None:
                    flight.output = result.output  # type: ignore[assignment]
                    flight.logits = result.logits
        self._wake.set()

    _reply_error: BaseException | None = None

    # -- one turn of the loop -------------------------------------------------------------------

    async def _iterate(self) -> None:
        self._collect()
        plan = self._schedule()
        if not plan.is_empty:
            self._issue(plan)
            return
        if plan.released or plan.preempted:
            self._send_steps(None, (), plan.released, plan.preempted)
        if not self._wake.is_set():
            with anyio.move_on_after(_MAX_WAIT_S):
                await self._wake.wait()
        self._wake = anyio.Event()
        self._collect()

    async def _forget_released(self) -> None:
        released = self.scheduler.take_released()
        if released:
            self._send_steps(None, (), released, ())

    def _collect(self) -> None:
        """Apply the replies received so far: stage-0 completions, then finished plans in issue
        order."""
        if self._reply_error is not None:
            error = self._reply_error
            raise EngineFailedError(f"a worker failed a step: {error!r}") from error
        for flight in self._order:
            if flight.plan is not None and not flight.stage0_reported and not flight.stage0_left:
                flight.stage0_reported = True
                self.scheduler.on_stage0_done(flight.plan)
        while self._order and not self._order[0].left:
            flight = self._order.popleft()
            del self._flights[flight.seq_no]
            if flight.plan is not None:
                self._complete(flight)

    def _complete(self, flight: _Flight) -> None:
        plan = flight.plan
        assert plan is not None
        now = self.clock()
        output = flight.output
        if output is None:
            raise EngineFailedError(f"plan {plan.plan_id} finished without a sampling reply")
        if flight.logits is not None:
            self.logits_log.append((plan, flight.logits))
        finished = self._deliver(output, now)
        self.scheduler.on_step_done(plan, now, finished)
        self._add_block_hashes(output.sampled)
        self._admit_parked()
        stage = (flight.compute_seconds, plan.predicted_stage_time)
        self._record(plan, flight.issued_at, now - flight.issued_at, stage)
        # A lone prefill's long iteration shows another level than the ordinary batches'.
        if (
            self.time_scale is not None
            and flight.compute_seconds > 0
            and not ran_alone(plan, self.scheduler.config)
        ):
            # The step lasts as long as its slowest KVP group: observe that group's batch.
            shapes = max(plan.group_shapes().values(), key=self.time_scale.cost.batch_time)
            # Up to pp plans are in flight: the level may have moved since this one was priced,
            # and the error it shows is only what the level has not learned yet.
            level = self.time_scale.cost.time_scale / flight.level_at_issue
            self.time_scale.observe_batch(
                shapes, plan.predicted_stage_time * level, flight.compute_seconds
            )

    # -- sending --------------------------------------------------------------------------------

    def _issue(self, plan: BatchPlan) -> None:
        groups: list[list[ShardWork]] = [[] for _ in range(self.layout.kvp)]
        merge_rows = 0
        for seq in plan.seqs:
            request = self.requests[seq.request_id]
            tokens = request.tokens(seq.start, seq.end)
            spread = len(seq.shards) > 1
            works = seq_works(
                seq,
                self.layout.kvp,
                tokens=tokens,
                sampling=request.start_sampling(seq.start),
                score_rows=request.score_rows(seq.start, seq.end),
                token_mask=request.token_mask(seq.samples),
                merge_offset=merge_rows if spread else None,
            )
            if spread:
                merge_rows += len(tokens)
            for group_works, work in zip(groups, works, strict=True):
                if work is not None:
                    group_works.append(work)
        self._send_steps(plan, groups, plan.released, plan.preempted, merge_rows)
        in_flight = sum(1 for f in self._order if f.plan is not None)
        self.max_plans_in_flight = max(self.max_plans_in_flight, in_flight)

    def _send_steps(
        self,
        plan: BatchPlan | None,
        groups: list[list[ShardWork]] | tuple[()],
        release: tuple[str, ...],
        preempted: tuple[str, ...],
        merge_rows: int = 0,
    ) -> None:
        seq_no = self._next_seq
        self._next_seq += 1
        kvp = self.layout.kvp
        steps = [
            ShardStep(
                seq_no,
                -1 if plan is None else plan.plan_id,
                tuple(groups[g]) if groups else (),
                release,
                preempted,
                return_logits=self.record_logits and plan is not None,
                merge_rows=merge_rows,
            )
            for g in range(kvp)
        ]
        world = set(range(self.layout.world_size))
        flight = _Flight(
            seq_no,
            plan,
            self.clock(),
            set(self.layout.stage_ranks(0)) if plan is not None else set(),
            world,
        )
        if self.time_scale is not None:
            flight.level_at_issue = self.time_scale.cost.time_scale
        self._flights[seq_no] = flight
        self._order.append(flight)
        self.cluster.submit(steps, self._on_reply)


class _suppress_closed_loop:
    """call_soon_threadsafe raises once the engine's loop has closed: the reply is moot then."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, RuntimeError)
