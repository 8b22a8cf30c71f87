"""The stage actor: runs model steps on its ModelRunner, on the engine's model thread (off the
event loop), and samples.

In one process there is one stage holding every layer and the whole KV cache, so it is also the
last stage: it samples. It keeps, per request, the KV block table (extended by each step's new
blocks) and the sampling state (params and the request's own random generator).

A step may be paused between layers (ModelStep.pause) and resumed later (ResumeStep); the stage
keeps it meanwhile, and other steps, over other requests, may run in between. Its decodes are
not paused: they run through their remaining layers when it stops, and their tokens come back
with StepPaused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medha.actors.base import Actor
from medha.actors.messages import (
    Forget,
    ModelStep,
    ResumeStep,
    SampledToken,
    SeqWork,
    StepOutput,
    StepPaused,
    sampled_tokens,
)
from medha.actors.model_thread import ModelThread
from medha.actors.prompt_scores import score_prompts
from medha.errors import EngineClosedError
from medha.model.layerwise import LayerwiseStep
from medha.model.request_sampling import RequestSampling, sample_requests
from medha.model.runner import ModelRunner, StepSeq


@dataclass(slots=True)
class _SeqState:
    block_table: list[int]
    sampling: RequestSampling


@dataclass(slots=True)
class _PausedStep:
    step_id: int
    works: tuple[SeqWork, ...]
    """The sequences `progress` runs, in its order."""
    progress: LayerwiseStep
    seconds: float


class StageActor(Actor[ModelStep | ResumeStep | Forget]):
    def __init__(self, runner: ModelRunner, thread: ModelThread, name: str = "stage-0") -> None:
        super().__init__(name)
        self._runner: ModelRunner | None = runner
        self.thread = thread
        self._seqs: dict[str, _SeqState] = {}
        self._paused: dict[int, _PausedStep] = {}

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise EngineClosedError("the engine stopped: its model and KV cache are released")
        return self._runner

    def release(self) -> None:
        """Drop the model and its KV cache (the engine stopped). Now, not whenever Python's
        cycle collector reaches the stopped actor tasks' tracebacks that still reach this
        actor: until then a process that starts another engine would hold both, and on a GPU
        the next engine's memory check would count them as taken."""
        device = None if self._runner is None else self._runner.device
        self._runner = None
        self._seqs.clear()
        self._paused.clear()
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):  # its cache, not the current device's
                torch.cuda.empty_cache()

    async def handle(
        self, message: ModelStep | ResumeStep | Forget
    ) -> StepOutput | StepPaused | None:
        if isinstance(message, Forget):
            self._forget(message.release, message.preempted)
            return None
        # On the model thread, so the event loop keeps streaming tokens and accepting requests
        # meanwhile. torch releases the GIL inside its kernels.
        if isinstance(message, ResumeStep):
            return await self.thread.run(self.resume_step, message)
        return await self.thread.run(self.run_step, message)

    def run_step(self, step: ModelStep) -> StepOutput | StepPaused:
        started = time.perf_counter()
        self._forget(step.release, step.preempted)
        batch: list[StepSeq] = []
        for work in step.seqs:
            state = self._seqs.get(work.request_id)
            if work.sampling is not None:
                state = _SeqState([], RequestSampling(work.sampling))
                self._seqs[work.request_id] = state
            if state is None:
                raise RuntimeError(f"step for unknown request {work.request_id!r}")
            state.block_table.extend(work.new_blocks)
            state.sampling.observe(work.start, work.token_ids)
            batch.append(StepSeq(work.token_ids, work.start, state.block_table, work.samples))
        progress = self.runner.start_step(batch)
        return self._advance(
            _PausedStep(step.step_id, step.seqs, progress, 0.0), step.pause, started
        )

    def resume_step(self, message: ResumeStep) -> StepOutput | StepPaused:
        started = time.perf_counter()
        paused = self._paused.pop(message.step_id, None)
        if paused is None:
            raise RuntimeError(f"no paused step {message.step_id}")
        return self._advance(paused, message.pause, started)

    def _advance(
        self, paused: _PausedStep, pause: threading.Event | None, started: float
    ) -> StepOutput | StepPaused:
        if not paused.progress.advance(None if pause is None else pause.is_set):
            sampled = self._finish_decodes(paused)
            paused.seconds += time.perf_counter() - started
            self._paused[paused.step_id] = paused
            return StepPaused(paused.step_id, paused.progress.next_layer, paused.seconds, sampled)
        progress = paused.progress
        sampled = self._sample(paused.works, progress.logits())
        scores = score_prompts(
            progress.hidden,
            paused.works,
            lambda rows: progress.model.head(rows, None),
            lambda request_id: self._seqs[request_id].sampling,
        )
        seconds = paused.seconds + time.perf_counter() - started
        return StepOutput(paused.step_id, sampled, seconds, scores)

    def _finish_decodes(self, paused: _PausedStep) -> dict[str, SampledToken]:
        """Run the paused step's decodes through their remaining layers now, and keep only
        its other sequences paused."""
        decodes = [i for i, work in enumerate(paused.works) if work.decode]
        if not decodes or len(decodes) == len(paused.works):
            return {}
        done, rest = self.runner.split_step(paused.progress, decodes)
        sampled = self._sample([paused.works[i] for i in decodes], done.run())
        paused.works = tuple(work for work in paused.works if not work.decode)
        paused.progress = rest
        return sampled

    def _sample(self, works: Sequence[SeqWork], logits: torch.Tensor) -> dict[str, SampledToken]:
        """The tokens of `works`' sampling sequences, from their logits rows (in order)."""
        sampling = [work for work in works if work.samples]
        if not sampling:
            return {}
        out = sample_requests(
            logits,
            [self._seqs[work.request_id].sampling for work in sampling],
            [work.token_mask for work in sampling],
        )
        return sampled_tokens([work.request_id for work in sampling], out)

    def _forget(self, release: tuple[str, ...], preempted: tuple[str, ...]) -> None:
        for request_id in release:
            self._seqs.pop(request_id, None)
        for request_id in preempted:
            state = self._seqs.get(request_id)
            if state is not None:
                state.block_table.clear()

    @property
    def num_tracked(self) -> int:
        return len(self._seqs)
