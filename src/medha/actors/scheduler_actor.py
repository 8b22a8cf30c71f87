"""The scheduler actor: owns the pure Scheduler and every request's engine-side record.

Its loop: take new requests and aborts from the mailbox, ask the Scheduler for the next plan,
send it to the stage actor as a ModelStep, then turn the sampled tokens into stream events and
tell the Scheduler the step is done. One plan is in flight at a time in one process (one
pipeline stage); the stage runs it on the model thread, so the event loop stays free meanwhile.

With `pause_steps`, the mailbox is also read while a step runs: when a newly arrived request
ranks ahead of the step's prefills (Scheduler.pause_time), the step stops at its next layer
boundary, its decodes are finished at once, the newcomer's plans run (with those decodes' next
tokens), and the step's prefill chunks resume where they stopped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

import anyio

from medha.actors.base import Actor, ActorStoppedError
from medha.actors.messages import Forget, ModelStep, ResumeStep, SeqWork, StepOutput, StepPaused
from medha.actors.scheduler_messages import Abort, IterationRecord, Submit
from medha.actors.stage import StageActor
from medha.actors.tracked import TrackedRequest
from medha.engine_metrics import EngineMetrics
from medha.errors import (
    EngineClosedError,
    EngineFailedError,
    GrammarViolationError,
    InvalidRequestError,
)
from medha.log import get_logger
from medha.perf.time_scale import OnlineTimeScale
from medha.request import TokenEvent
from medha.scheduler import BatchPlan, Scheduler, SeqKind
from medha.scheduler.pausing import ran_alone

_log = get_logger(__name__)

# How long to wait for a message when the scheduler has work but can issue nothing (memory
# full of in-flight work cannot happen with one stage, but a plan may still come back empty).
_IDLE_POLL_S = 0.002


class SchedulerActor(Actor[Submit | Abort]):
    def __init__(
        self,
        scheduler: Scheduler,
        stage: StageActor,
        clock: Callable[[], float],
        record_iterations: bool = False,
        time_scale: OnlineTimeScale | None = None,
        pause_steps: bool = False,
        metrics: EngineMetrics | None = None,
    ) -> None:
        super().__init__("scheduler")
        self.scheduler = scheduler
        self.stage = stage
        self.clock = clock
        self.time_scale = time_scale
        """Learns how much slower or faster than predicted the stage runs (None: never)."""
        self.requests: dict[str, TrackedRequest] = {}
        self._parked: list[TrackedRequest] = []
        """Submitted under an id whose aborted request is still in flight (see _handle)."""
        self.pause_steps = pause_steps
        """Let a step stop between layers for a request that ranks ahead of it."""
        self.pauses = 0
        """Steps stopped between layers so far."""
        self._held: list[Submit | Abort] | None = None
        """While a pausable step is in flight (None otherwise): messages that wait until it is
        done (see _must_wait), in order."""
        self.iterations = 0
        self.history: list[IterationRecord] | None = [] if record_iterations else None
        self.metrics = metrics
        """Where requests' tokens and ends, and iterations, are counted (None: nowhere)."""

    def tell(self, message: Submit | Abort) -> None:
        super().tell(message)
        if isinstance(message, Submit) and self.metrics is not None:
            # Counted from here, however it ends: refused late, parked, left in the mailbox.
            message.request.on_end = self._count_end

    async def run(self) -> None:
        try:
            while await self._take_messages():
                await self._iterate()
        except ActorStoppedError:
            self.stop()  # the stage was stopped under a step: the engine is closing
        except Exception as exc:
            self.fail(exc)
            self._fail_requests(EngineFailedError(f"the engine failed: {exc!r}"), exc)
            raise
        finally:
            if self.failure is None:
                self._fail_requests(EngineClosedError("the engine was closed"), None)
            # Requests submitted but never taken from the mailbox (a step was running) end the
            # same way: failed if the engine failed, closed if it was closed.
            while (message := self.receive_nowait()) is not None:
                if isinstance(message, Submit):
                    message.request.fail(self._ending_error(), self.clock())
            if self.failure is None:
                self.stop()  # later tells raise ActorStoppedError (ActorFailedError if failed)
            self.close_mailbox()

    def _ending_error(self) -> EngineClosedError | EngineFailedError:
        if self.failure is None:
            return EngineClosedError("the engine was closed")
        error = EngineFailedError(f"the engine failed: {self.failure!r}")
        error.__cause__ = self.failure
        return error

    async def _take_messages(self) -> bool:
        """Handle what the mailbox holds; block for a message when there is no work at all.
        False once the mailbox is closed (the engine is stopping)."""
        try:
            while (message := self.receive_nowait()) is not None:
                self._handle(message)
            if not self.scheduler.has_work:
                await self._forget_released()
                self._handle(await self.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return False
        return True

    async def _forget_released(self) -> None:
        """Going idle: the stage forgets the requests the last plans finished now, rather than
        with whatever plan comes next."""
        released = self.scheduler.take_released()
        if released:
            await self.stage.ask(Forget(released))

    def _handle(self, message: Submit | Abort) -> None:
        if self._held is not None and self._must_wait(message):
            self._held.append(message)
            return
        if isinstance(message, Submit):
            request = message.request
            retiring = self.scheduler.get(request.request_id) is not None
            if retiring and request.request_id not in self.requests:
                # The id's previous request was aborted but a plan in flight still refers to it
                # (a pipeline): admit this one when that plan is done and the old one retires.
                self._parked.append(request)
                return
            self._admit(request)
            return
        parked = next((r for r in self._parked if r.request_id == message.request_id), None)
        if parked is not None and message.request in (None, parked):
            self._parked.remove(parked)
            parked.abort(self.clock())
            return
        tracked = self.requests.get(message.request_id)
        if message.request is not None and tracked is not message.request:
            return  # that request has finished; the id is free, or another request's
        request = self.requests.pop(message.request_id, None)
        if request is not None:
            self._settle_deadline(request)
        if self.scheduler.abort(message.request_id) or request is not None:
            _log.info("request aborted", request_id=message.request_id)
        if request is not None:
            request.abort(self.clock())

    def _must_wait(self, message: Submit | Abort) -> bool:
        """While a pausable step is in flight: an abort of a request in flight waits until
        the step is done, so that it takes effect as between steps (its KV freed at once, and
        `stats()` never shows it gone while its blocks are still held); a request submitted
        under the id of such an abort waits behind it."""
        assert self._held is not None
        if isinstance(message, Abort):
            scheduled = self.scheduler.get(message.request_id)
            return scheduled is not None and scheduled.in_flight > 0
        request_id = message.request.request_id
        return any(isinstance(m, Abort) and m.request_id == request_id for m in self._held)

    def _admit(self, request: TrackedRequest) -> None:
        try:
            self.scheduler.add_request(
                request.request_id,
                len(request.prompt_ids),
                request.max_new_tokens,
                request.metrics.arrival,
                request.deadline,
                request.block_hashes,
                # A request that scores its prompt computes all of it (it fills the cache).
                scores_prompt=request.params.prompt_logprobs is not None,
            )
        except Exception as exc:  # checked before submitting; a late refusal ends only it
            request.fail(exc, self.clock())
            return
        scheduled = self.scheduler.get(request.request_id)
        if scheduled is not None:
            request.metrics.deadline = scheduled.deadline
        self.requests[request.request_id] = request
        _log.info(
            "request queued",
            request_id=request.request_id,
            prompt_tokens=len(request.prompt_ids),
            deadline=request.metrics.deadline,
        )

    def _admit_parked(self) -> None:
        """Admit the parked requests whose id's previous request has retired."""
        if not self._parked:
            return
        waiting = self._parked
        self._parked = []
        for request in waiting:
            self._handle(Submit(request))

    async def _iterate(self) -> None:
        if not self.scheduler.has_work:
            return
        plan = self._schedule()
        if plan.is_empty:
            if plan.released or plan.preempted:
                await self.stage.ask(Forget(plan.released, plan.preempted))
            with anyio.move_on_after(_IDLE_POLL_S):
                message = await self.receive()
                self._handle(message)
            return
        await self._run_plan(plan, self.pause_steps)

    async def _run_plan(self, plan: BatchPlan, pausable: bool) -> None:
        started, pauses = self.clock(), self.pauses
        if pausable:
            output = await self._run_pausable(plan)
        else:
            output = await self.stage.ask(self._model_step(plan))
        now = self.clock()
        try:
            self.scheduler.on_stage0_done(plan)
            finished = self._deliver(output, now)
            self.scheduler.on_step_done(plan, now, finished)
        finally:
            if pausable:
                # After the step's tokens: an abort that came during its last step lets a
                # request that ended there end so, as between steps (and as vLLM). Handled
                # even if delivering failed: a request held behind an abort must still end.
                self._handle_held()
        self._add_block_hashes(output.sampled)
        self._admit_parked()
        self._record(plan, started, output.seconds)
        # A step that paused ran as two batches (its decodes, split off, and the rest): its
        # time is not the predicted batch's. Nor a lone prefill's long iteration: the level it
        # shows is not the ordinary batches'.
        if (
            self.time_scale is not None
            and self.pauses == pauses
            and not ran_alone(plan, self.scheduler.config)
        ):
            (shapes,) = plan.group_shapes().values()  # one process: one KVP group
            self.time_scale.observe_batch(shapes, plan.predicted_time, output.seconds)
        scale = None if self.time_scale is None else self.time_scale.cost
        _log.debug(
            "iteration",
            step=plan.plan_id,
            seqs=len(plan.seqs),
            decodes=plan.num_decodes,
            tokens=plan.num_tokens,
            predicted_s=round(plan.predicted_time, 5),
            measured_s=round(output.seconds, 5),
            time_scale=scale and round(scale.time_scale, 4),
            context_scale=scale and round(scale.context_scale, 4),
        )

    # -- pausing a step between layers ----------------------------------------------------------

    async def _run_pausable(self, plan: BatchPlan) -> StepOutput:
        """Run `plan`'s step, taking messages meanwhile; whenever it pauses, run the plans of
        the requests it paused for, then resume it. The messages held meanwhile are handled
        once its output is delivered (_handle_held), or at once if it fails."""
        pause = threading.Event()
        message: ModelStep | ResumeStep = self._model_step(plan, pause)
        self._held = []
        try:
            while True:
                result = await self._ask_watching(message, plan, pause)
                if isinstance(result, StepOutput):
                    return result
                self.pauses += 1
                if result.sampled:  # the step's decodes, finished as it paused
                    now = self.clock()
                    early = StepOutput(plan.plan_id, result.sampled, result.seconds)
                    finished = self._deliver(early, now)
                    self.scheduler.on_seqs_done(plan, result.sampled.keys(), now, finished)
                    self._add_block_hashes(result.sampled)
                self.scheduler.suspend(plan)
                _log.debug("iteration paused", step=plan.plan_id, layers_done=result.layers_done)
                ran = await self._run_while_paused(plan)
                self.scheduler.resume(plan, pause_again=ran)
                pause = threading.Event()
                message = ResumeStep(plan.plan_id, pause)
        except BaseException:
            self._handle_held()
            raise

    def _handle_held(self) -> None:
        held, self._held = self._held, None
        for waiting in held or ():
            self._handle(waiting)

    async def _ask_watching(
        self, message: ModelStep | ResumeStep, plan: BatchPlan, pause: threading.Event
    ) -> StepOutput | StepPaused:
        # The step's own error is re-raised as it is, not wrapped in the task group's
        # ExceptionGroup: run() tells a stopped stage (the engine closing) from a failure.
        error: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, plan, pause)
            try:
                result: StepOutput | StepPaused = await self.stage.ask(message)
            except Exception as exc:
                error = exc
            group.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def _watch(self, plan: BatchPlan, pause: threading.Event) -> None:
        """While `plan`'s step runs: handle messages as they come, and ask the step to pause as
        soon as a newer request should go first: when one arrives that is ahead already, or
        when one overtakes (Scheduler.pause_time). Cancelled when the step returns."""
        try:
            while True:
                due = None if pause.is_set() else self.scheduler.pause_time(plan, self.clock())
                if due is not None and due <= self.clock():
                    pause.set()
                    continue
                wait = math.inf if due is None else due - self.clock()
                with anyio.move_on_after(wait):
                    self._handle(await self.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return  # the engine is closing: the step finishes, then the run loop ends

    async def _run_while_paused(self, paused: BatchPlan) -> bool:
        """Plans for the requests `paused` stopped for, one at a time, while the Scheduler
        says they still rank ahead of it (and its pause budget lasts). False if there was
        nothing to run."""
        ran = False
        while True:
            plan = self._schedule()
            if plan.is_empty:
                if plan.released or plan.preempted:
                    await self.stage.ask(Forget(plan.released, plan.preempted))
                return ran
            await self._run_plan(plan, pausable=False)
            ran = True
            self._handle_pending()
            if not self.scheduler.should_pause(paused, self.clock()):
                return ran

    def _handle_pending(self) -> None:
        """Handle the messages already in the mailbox, without waiting for more."""
        while (message := self.receive_nowait()) is not None:
            self._handle(message)

    def _model_step(self, plan: BatchPlan, pause: threading.Event | None = None) -> ModelStep:
        works = []
        for seq in plan.seqs:
            request = self.requests[seq.request_id]
            works.append(
                SeqWork(
                    seq.request_id,
                    seq.start,
                    request.tokens(seq.start, seq.end),
                    tuple(block for _, blocks in seq.new_blocks for block in blocks),
                    seq.samples,
                    request.start_sampling(seq.start),
                    seq.kind is SeqKind.DECODE,
                    request.score_rows(seq.start, seq.end),
                    request.token_mask(seq.samples),
                )
            )
        return ModelStep(plan.plan_id, tuple(works), plan.released, plan.preempted, pause)

    # -- shared with the multi-process actor -----------------------------------------------------

    def _schedule(self) -> BatchPlan:
        plan = self.scheduler.schedule(self.clock())
        for request_id in plan.preempted:
            if request_id in self.requests:
                self.requests[request_id].preemptions += 1
            _log.info("request preempted", request_id=request_id)
        return plan

    def _settle_deadline(self, request: TrackedRequest) -> None:
        """Before its first token or its end without one: a default deadline follows the
        scheduler's re-predictions until then."""
        if request.deadline is None and request.metrics.first_token_time is None:
            scheduled = self.scheduler.get(request.request_id)
            if scheduled is not None:
                request.metrics.deadline = scheduled.deadline

    def _count_end(self, request: TrackedRequest, reason: str) -> None:
        assert self.metrics is not None
        self.metrics.request_ended(request.metrics, reason, len(request.prompt_ids))

    def _record(
        self,
        plan: BatchPlan,
        started: float,
        seconds: float,
        stage: tuple[float, float] | None = None,
    ) -> None:
        """Count an iteration that took `seconds` from `started`. `stage`: the measured and
        predicted seconds of its slowest pipeline stage (default: its own)."""
        self.iterations += 1
        if self.metrics is not None:
            measured, predicted = stage or (seconds, plan.predicted_time)
            self.metrics.iteration(measured, predicted, plan.num_tokens, plan.num_decodes)
        if self.history is not None:
            self.history.append(
                IterationRecord(
                    plan.plan_id,
                    started,
                    seconds,
                    plan.predicted_time,
                    tuple((s.request_id, s.q_tokens, s.kind.value == "prefill") for s in plan.seqs),
                )
            )

    def _deliver(self, output: StepOutput, now: float) -> set[str]:
        """Stream each sampled token; returns the requests whose stop conditions ended them."""
        finished: set[str] = set()
        for request_id, scores in output.prompt_scores.items():
            if (scored := self.requests.get(request_id)) is not None:
                try:
                    scored.add_prompt_scores(scores)
                except RuntimeError as exc:  # a gap in its prompt logprobs: a bug, ending it
                    self._fail_one(scored, exc)
        for request_id, sampled in output.sampled.items():
            request = self.requests.get(request_id)
            if request is None:
                continue  # aborted while its step ran
            try:
                update = request.push_token(sampled.token_id)
            except GrammarViolationError as exc:
                self._fail_one(request, exc)
                continue
            self._settle_deadline(request)
            request.metrics.record_token(now)
            if self.metrics is not None:
                self.metrics.token(request.metrics, len(request.prompt_ids))
            event = TokenEvent(
                request_id,
                sampled.token_id,
                update.text,
                update.finish_reason,
                sampled.logprob,
                sampled.top_logprobs,
                *request.prompt_logprobs_once(),
                metrics=request.metrics if update.finished else None,
            )
            if update.finished:
                request.metrics.finished_time = now
                finished.add(request_id)
                del self.requests[request_id]
                _log.info(
                    "request finished",
                    request_id=request_id,
                    reason=update.finish_reason,
                    tokens=request.metrics.num_output_tokens,
                    cached_tokens=request.metrics.cached_tokens,
                    ttft=request.metrics.ttft,
                )
            request.emit(event)
        return finished

    def _add_block_hashes(self, sampled: Iterable[str]) -> None:
        """Hand the scheduler the digests of the blocks these requests' new tokens filled
        (prefix caching), after it counted the tokens."""
        for request_id in sampled:
            request = self.requests.get(request_id)  # finished or aborted ones are gone
            if request is None or not (digests := request.new_block_hashes()):
                continue
            try:
                self.scheduler.add_block_hashes(request_id, digests)
            except InvalidRequestError as exc:
                # Engine and scheduler disagree on its length: a bug, which ends it alone.
                self._fail_one(request, exc)

    def _fail_one(self, request: TrackedRequest, error: BaseException) -> None:
        """End one request with `error` (a bug that concerns it alone); the others go on."""
        _log.error("request failed", request_id=request.request_id, error=repr(error))
        self._settle_deadline(request)
        self.scheduler.abort(request.request_id)
        del self.requests[request.request_id]
        request.fail(error, self.clock())

    def _fail_requests(self, error: BaseException, cause: BaseException | None) -> None:
        for request in self.requests.values():
            self._settle_deadline(request)  # not the parked: their id is another request's
        for request in [*self.requests.values(), *self._parked]:
            failure = type(error)(str(error))
            failure.__cause__ = cause
            request.fail(failure, self.clock())
        self.requests.clear()
        self._parked.clear()
