"""Engine: the embeddable, awaitable front of medha.

    async with medha.Engine(medha.EngineConfig(model="smollm2-135m")) as engine:
        async for ev in engine.stream("Hello", deadline=2.0):
            print(ev.text, end="")

Inside, two actors run on the caller's event loop, in a task of their own (actors/host.py): the
scheduler actor (the pure LARS Scheduler plus every request's record) and the stage actor (the
model and its KV cache, stepping on the engine's model thread, actors/model_thread.py). The
library never starts an event loop of its own: it works from `asyncio.run`/`anyio.run` scripts,
web servers and Jupyter alike. An engine belongs to the loop it was started on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from medha.actors.host import ActorHost
from medha.actors.model_thread import ModelThread
from medha.actors.scheduler_actor import SchedulerActor
from medha.actors.scheduler_messages import Abort, IterationRecord, Submit
from medha.actors.stage import StageActor
from medha.actors.tracked import TrackedRequest
from medha.config import EngineConfig
from medha.engine_loop import check_loop, starting_loop
from medha.engine_metrics import EngineMetrics
from medha.engine_setup import EngineParts, online_time_scale
from medha.engine_stats import EngineStats, on_loop
from medha.errors import (
    EngineClosedError,
    EngineFailedError,
    InvalidRequestError,
)
from medha.log import get_logger
from medha.request import Completion, Prompt, RequestMetrics, TokenEvent, check_deadline
from medha.request_constraints import RequestConstraints
from medha.request_input import (
    cache_salt_root,
    checked_sampling,
    prompt_token_ids,
    request_ids,
)
from medha.request_prompt import PromptPreparer, is_long, prepare_off_loop, snapshot
from medha.sampling import SamplingParams

if TYPE_CHECKING:
    from medha.parallel.engine_parts import ParallelParts
    from medha.parallel.worker_build import WorkerBuild

_log = get_logger(__name__)


def _seconds_since(t0: float) -> float:
    return time.monotonic() - t0


class Engine:
    """Serve one model; use as `async with Engine(config) as engine:`.

    `record_iterations`: keep a record of every iteration in `iteration_history` (benchmarks,
    plots: it grows without bound). `model_name`: the label of its Prometheus metrics,
    `metrics` (default: config.model; None with config.enable_metrics off)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        record_iterations: bool = False,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(
                f"Engine takes a medha.EngineConfig, got {type(config).__name__}: "
                "Engine(medha.EngineConfig(model=...))"
            )
        self.config = config
        self._record_iterations = record_iterations
        self.metrics = EngineMetrics.of(self, model_name or config.model)
        self._host: ActorHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler_actor: SchedulerActor | None = None
        self._stage: StageActor | None = None
        self._model_thread: ModelThread | None = None
        self._started = False
        """start() finished: from here stop() stops the actors itself."""
        self._building: WorkerBuild | None = None
        """Parallel start: set once the thread that starts the workers is done."""
        self._closed = False
        self._ids = itertools.count()
        self._by_id: weakref.WeakValueDictionary[str, TrackedRequest] = (
            weakref.WeakValueDictionary()
        )
        """Requests by id, for the in-use check (weak: a stream dropped unstarted frees its id)."""
        self._t0 = time.monotonic()
        # Not a bound method: the scheduler actor keeps the clock, and must not keep the engine.
        self._clock: Callable[[], float] = partial(_seconds_since, self._t0)
        self.tokenizer: Any = None
        self.max_model_len = 0
        self._vocab_size = 0
        self._constraints: RequestConstraints | None = None
        self._prompts: PromptPreparer | None = None
        self.calibration: Any = None
        self.sampling_defaults: dict[str, Any] = {}
        """The SamplingParams fields a request without SamplingParams gets: the model's
        generation_config.json's (EngineConfig.generation_config), set at start."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load the model (on the model thread), calibrate, and start the actors."""
        if self._loop is not None or self._closed:
            raise EngineClosedError("an Engine starts once; create a new one")
        self._loop = starting_loop()
        try:
            if self.config.parallel.uses_workers:
                await self._start_parallel()
            else:
                # Loading, calibration and every step on one thread: medha.actors.model_thread.
                name = Path(self.config.model).name or "model"
                self._model_thread = ModelThread(f"medha-model-{name}")
                await self._start_single(self._model_thread)
        except BaseException:
            # Failed, or cancelled as its actors started: a closed engine, which must not keep
            # the model and its KV cache (stop() has nothing to stop: it never started).
            self._closed = True
            if self._stage is not None:
                self._stage.release()
            if self._model_thread is not None:
                self._model_thread.close()
            raise
        if self._closed:
            # stop() came while this started and left the stopping to it: stop it now.
            await self._stop_started()
            raise EngineClosedError("the engine was stopped while it started")
        self._started = True

    async def _start_single(self, thread: ModelThread) -> None:
        from medha.engine_setup import build_engine_parts

        parts = await thread.run(build_engine_parts, self.config)
        self._take_model(parts.tokenizer, parts.runner.arch.vocab_size, parts)
        self.calibration = parts.calibration
        self._stage = StageActor(parts.runner, thread)
        self._scheduler_actor = SchedulerActor(
            parts.scheduler,
            self._stage,
            self._clock,
            self._record_iterations,
            online_time_scale(self.config, parts.cost, parts.max_model_len),
            pause_steps=self.config.pauses_iterations,
            metrics=self.metrics,
        )
        await self._start_actors(self._stage.run, self._scheduler_actor.run)
        _log.info(
            "engine started",
            model=self.config.model,
            policy=self.config.policy,
            kv_blocks=parts.scheduler.config.num_blocks,
        )

    def _take_model(
        self, tokenizer: Any, vocab_size: int, parts: EngineParts | ParallelParts
    ) -> None:
        """What requests are checked and prepared with, from the loaded model."""
        max_model_len, scheduler = parts.max_model_len, parts.scheduler
        self.tokenizer, self.max_model_len, self._vocab_size = tokenizer, max_model_len, vocab_size
        self.sampling_defaults = dict(parts.sampling_defaults)
        self._constraints = RequestConstraints(tokenizer, vocab_size)
        caches = self.config.enable_prefix_caching
        self._prompts = PromptPreparer(
            tokenizer, vocab_size, max_model_len, scheduler, self.config.block_size if caches else 0
        )

    async def _start_parallel(self) -> None:
        """world > 1: the model runs in worker processes (medha.parallel); this process keeps
        the scheduler actor, which talks to them by RPC, and a supervisor of the workers."""
        from medha.actors.pipeline_scheduler import PipelineSchedulerActor, WorkersFailed
        from medha.parallel.worker_build import WorkerBuild

        # A cancelled start must leave no worker behind: see medha.parallel.worker_build.
        build = self._building = WorkerBuild(self.config)
        try:
            parts = await build.run()
            self._take_model(parts.tokenizer, parts.vocab_size, parts)
            self.calibration = parts.calibration
            actor = PipelineSchedulerActor(
                parts.scheduler,
                parts.cluster,
                self._clock,
                self._record_iterations,
                online_time_scale(self.config, parts.cost, parts.max_model_len),
                self.metrics,
            )
            self._scheduler_actor = actor

            def workers_failed(error: BaseException) -> None:
                if actor.failure is None and not actor.stopped:
                    actor.tell(WorkersFailed(error))

            # From here the supervisor task closes the workers when it ends.
            await self._start_actors(partial(parts.cluster.supervise, workers_failed), actor.run)
        except BaseException:
            await build.abandon()
            raise
        _log.info("engine started", model=self.config.model, parallel=str(self.config.parallel))

    async def _start_actors(self, *loops: Callable[[], Awaitable[None]]) -> None:
        self._host = ActorHost(f"medha-engine-{self.config.model}")
        await self._host.start([partial(self._contained, loop) for loop in loops])

    @staticmethod
    async def _contained(run: Callable[[], Awaitable[None]]) -> None:
        """Run an actor loop; if it fails, keep the failure here: one failed loop must not
        cancel the others before they have told their streams. The actor has already
        delivered the failure where it belongs: to every open stream, and to later calls."""
        try:
            await run()
        except Exception as exc:
            _log.error("engine failed", error=repr(exc))

    async def stop(self) -> None:
        """Stop serving: open streams end with EngineClosedError; idempotent."""
        if not self._started:
            # Not started, or still starting (loading, or starting its actors): start() sees
            # this and stops what it built. Cancelling its half-started actors here would
            # surface a stray CancelledError from it instead.
            self._closed = True
            if self._building is not None:
                # A cancelled parallel start: its thread runs on and stops the workers it
                # starts. Wait for that, so the process can start another engine at once.
                await anyio.to_thread.run_sync(self._building.done.wait)
            return
        self._check_loop()
        self._closed = True
        for request in list(self._by_id.values()):
            if request.stop_preparing is not None:
                request.stop_preparing()  # its stream then ends with EngineClosedError
        # Not returning early when closed already: a second caller (a shutdown hook racing
        # `async with`) waits for the actors to stop too.
        await self._stop_started()

    async def _stop_started(self) -> None:
        assert self._host is not None
        try:
            await self._host.stop()
            # The actors are done, and with them any step on the model thread.
            if self._stage is not None:
                self._stage.release()
        finally:
            if self._model_thread is not None:
                self._model_thread.close()

    def _check_loop(self) -> None:
        check_loop(self._loop)  # medha.engine_loop

    # -- requests ------------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        deadline: float | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Validate and return an async iterator of the request's TokenEvents.

        Invalid input raises here, before anything is queued. The request is queued when the
        iteration starts; closing the iterator or cancelling the consuming task aborts it and
        frees its KV cache (a `break` out of the `async for` does once the iterator is closed:
        use `contextlib.aclosing`).

        A long prompt (over 16,384 characters, or token ids) is tokenized and checked on a
        worker thread when the iteration starts, so that other streams run on meanwhile: the
        errors that need its tokens (too long for the context, ids outside the vocabulary)
        raise from the iteration, still before anything is queued. Its TTFT counts that time.

        `cache_salt` (vLLM's): only requests with the same salt share prefix-cache blocks, so
        that a tenant cannot time which prefixes another has sent.
        """
        request = self._prepare(prompt, sampling, deadline, request_id, cache_salt)
        return self._stream(request)

    async def generate(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        deadline: float | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> Completion:
        """Run a request to the end and return its Completion (see `stream`)."""
        request = self._prepare(prompt, sampling, deadline, request_id, cache_salt)
        return await self._complete(request)

    async def _complete(self, request: TrackedRequest) -> Completion:
        """Stream a prepared request to its end; its Completion."""
        async for _ in self._stream(request):
            pass
        return request.completion()

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort a request by id, or several (an iterable of ids, as vLLM's AsyncLLM takes
        them); an id no request holds is a no-op. A stream ends with an event of finish_reason
        "abort" and no token. A stream made but not iterated yet is aborted too: its iteration
        then yields only that event, and nothing is queued. The id is free for a new request
        when this returns, as in vLLM; the end itself, and its KV blocks freed (`stats()`),
        follow once the scheduler takes the abort, after the step in flight."""
        self._check_loop()
        actor = self._actor()
        ids = request_ids(request_id)
        for one in ids:
            request = self._by_id.get(one)
            if request is not None and request.holds_id and not request.submitted:
                # Never queued: it ends here, unseen by the scheduler (not in stats().aborted).
                now = self._clock()
                request.metrics.arrival = request.metrics.arrival or now  # 0: not iterated
                request.abort(now)
                if request.stop_preparing is not None:
                    request.stop_preparing()
                _log.info("request aborted", request_id=one, queued=False)
                continue
            if request is not None and request.holds_id:
                request.aborting = True
            actor.tell(Abort(one, request))

    def stats(self) -> EngineStats:
        """A snapshot, taken on the engine's loop (from another thread, waiting for it)."""
        return on_loop(self._loop, partial(EngineStats.of, self._actor()))

    def tokenize(self, prompt: Prompt, sampling: SamplingParams | None = None) -> list[int]:
        """The token ids a request of `prompt` runs (the last `truncate_prompt_tokens` of
        them, with `sampling`): to count a prompt's tokens, or to send them instead of its
        text. Raises what `stream` raises for the prompt itself (empty, not UTF-8, ids outside
        the vocabulary); whether it fits the context is `stream`'s to check. It runs on the
        calling thread: for a long text, from a coroutine, call it through
        `anyio.to_thread.run_sync` (the tokenizers library releases the GIL while it encodes)."""
        self._actor()
        params = checked_sampling(sampling, self.sampling_defaults)
        keep = params.prompt_keep(self.max_model_len)
        return self._prompt_ids(prompt, keep)

    def output_limit(self, prompt_tokens: int, sampling: SamplingParams | None = None) -> int:
        """How many tokens a request of a `prompt_tokens`-token prompt may generate with
        `sampling`: its `max_tokens` (sampling=None: the engine's default sampling, whose
        max_tokens is 16), or, where max_tokens is None, what the context and the KV cache
        leave. Raises what `stream` raises for a request too long for them
        (PromptTooLongError, RequestTooLargeError): to find how much of a long input fits
        before sending it."""
        self._actor()
        assert self._prompts is not None  # set at start
        params = checked_sampling(sampling, self.sampling_defaults)
        return self._prompts.output_limit(prompt_tokens, params)

    def now(self) -> float:
        """The engine's clock: seconds since this Engine was created, on time.monotonic. The
        times of RequestMetrics are on it (`time.monotonic() - engine.now()` converts)."""
        return self._clock()

    @property
    def iteration_history(self) -> list[IterationRecord]:
        history = self._actor().history
        if history is None:
            raise RuntimeError("create the Engine with record_iterations=True")
        return history

    # -- internals -----------------------------------------------------------------------------

    def _actor(self) -> SchedulerActor:
        actor = self._scheduler_actor
        if actor is None or self._closed:
            raise EngineClosedError("the engine is not running (use `async with Engine(...)`)")
        if actor.failure is not None:
            raise EngineFailedError("the engine has failed") from actor.failure
        return actor

    async def _stream(self, request: TrackedRequest) -> AsyncGenerator[TokenEvent, None]:
        finished = False
        actor: SchedulerActor | None = None
        try:
            # A stream made on the engine's loop may still be iterated on another one, or
            # after the engine stopped: refused, and its id freed, as any unsubmitted stream.
            self._check_loop()
            actor = self._actor()
            if request.finish_reason is None:  # else aborted before its iteration started
                request.metrics.arrival = self._clock()
                if request.unprepared_prompt is not None:
                    await self._prepare_long_prompt(request)
                    actor = self._actor()  # the engine may have stopped meanwhile
            if request.finish_reason is None:  # else aborted while its prompt was prepared
                request.submitted = True
                actor.tell(Submit(request))
            async with request.receive:
                async for item in request.receive:
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    finished = item.finish_reason is not None
                    yield item
        finally:
            if not finished:
                request.abandoned = True
                if not request.submitted:
                    request.close_unsubmitted()
                elif actor is not None and not self._closed and actor.failure is None:
                    actor.tell(Abort(request.request_id, request))

    def _prepare(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None,
        deadline: float | None,
        request_id: str | None,
        cache_salt: str | None = None,
    ) -> TrackedRequest:
        """Validate a request and reserve its id; nothing is queued."""
        self._check_loop()
        self._actor()
        params = checked_sampling(sampling, self.sampling_defaults)
        assert self._prompts is not None and self._constraints is not None  # set at start
        hash_root = cache_salt_root(cache_salt)
        long_prompt = is_long(prompt)
        if long_prompt:
            # Prepared when its iteration starts, on a worker thread (medha.request_prompt).
            # What needs no tokens is checked here all the same.
            prepared = self._prompts.placeholder(prompt, params)
        else:
            prepared = self._prompts.prepare(prompt, params, hash_root)
        params.check_vocab(self._vocab_size)
        checked_deadline = check_deadline(deadline)
        bad_words_ids = self._constraints.bad_words_ids(params.bad_words)
        grammar = self._constraints.grammar(params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while self._taken(request_id):  # a caller may have named a request "req-7"
                request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        elif self._taken(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = TrackedRequest(
            request_id=request_id,
            prompt_ids=prepared.ids,
            params=params,
            max_new_tokens=prepared.max_new_tokens,
            output=prepared.output,
            metrics=RequestMetrics(
                arrival=0.0,
                deadline=checked_deadline or 0.0,
                deadline_given=checked_deadline is not None,
            ),
            deadline=checked_deadline,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
            bad_words_ids=bad_words_ids,
            grammar=grammar,
            hash_block_size=self._prompts.hash_block_size,
            block_hashes=prepared.block_hashes,
            hash_root=hash_root,
            unprepared_prompt=snapshot(prompt) if long_prompt else None,
        )
        self._by_id[request_id] = request
        return request

    async def _prepare_long_prompt(self, request: TrackedRequest) -> None:
        """Tokenize and check a long prompt `_prepare` left for later, off the event loop."""
        assert self._prompts is not None
        await prepare_off_loop(request, self._prompts)

    def _taken(self, request_id: str) -> bool:
        holder = self._by_id.get(request_id)
        return holder is not None and holder.holds_id

    def _prompt_ids(self, prompt: object, keep: int | None = None) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self._vocab_size, keep)
