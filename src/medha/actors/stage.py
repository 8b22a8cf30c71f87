"""The stage actor: runs model steps on its ModelRunner, on the engine's model thread (off the
event loop), and samples.

In one process there is one stage holding every layer and the whole KV cache, so it is also the
last stage: it samples. It keeps, per request, the KV block table (extended by each step's new
blocks) and the sampling state (params and the request's own random generator).

A step may be paused between layers (ModelStep.pause) and resumed later (ResumeStep); the stage
keeps it meanwhile, and other steps, over other requests, may run in between.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from medha.actors.base import Actor
from medha.actors.messages import (
    Forget,
    ModelStep,
    ResumeStep,
    SampledToken,
    StepOutput,
    StepPaused,
)
from medha.actors.model_thread import ModelThread
from medha.model.layerwise import LayerwiseStep
from medha.model.runner import ModelRunner, StepSeq
from medha.model.sampler import make_generator, sample
from medha.sampling import SamplingParams


@dataclass(slots=True)
class _SeqState:
    block_table: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None


@dataclass(slots=True)
class _PausedStep:
    step: ModelStep
    progress: LayerwiseStep
    seconds: float


class StageActor(Actor[ModelStep | ResumeStep | Forget]):
    def __init__(self, runner: ModelRunner, thread: ModelThread, name: str = "stage-0") -> None:
        super().__init__(name)
        self.runner = runner
        self.thread = thread
        self._seqs: dict[str, _SeqState] = {}
        self._paused: dict[int, _PausedStep] = {}

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
                generator = (
                    None
                    if work.sampling.is_greedy
                    else make_generator(work.sampling.seed, self.runner.device)
                )
                state = _SeqState([], work.sampling, generator)
                self._seqs[work.request_id] = state
            if state is None:
                raise RuntimeError(f"step for unknown request {work.request_id!r}")
            state.block_table.extend(work.new_blocks)
            batch.append(StepSeq(work.token_ids, work.start, state.block_table, work.samples))
        progress = self.runner.start_step(batch)
        return self._advance(_PausedStep(step, progress, 0.0), step.pause, started)

    def resume_step(self, message: ResumeStep) -> StepOutput | StepPaused:
        started = time.perf_counter()
        paused = self._paused.pop(message.step_id, None)
        if paused is None:
            raise RuntimeError(f"no paused step {message.step_id}")
        return self._advance(paused, message.pause, started)

    def _advance(
        self, paused: _PausedStep, pause: threading.Event | None, started: float
    ) -> StepOutput | StepPaused:
        step, progress = paused.step, paused.progress
        finished = progress.advance(None if pause is None else pause.is_set)
        seconds = paused.seconds + time.perf_counter() - started
        if not finished:
            self._paused[step.step_id] = _PausedStep(step, progress, seconds)
            return StepPaused(step.step_id, progress.next_layer, seconds)
        logits = progress.logits()
        sampling_seqs = [w for w in step.seqs if w.samples]
        sampled: dict[str, SampledToken] = {}
        if sampling_seqs:
            states = [self._seqs[w.request_id] for w in sampling_seqs]
            out = sample(logits, [s.sampling for s in states], [s.generator for s in states])
            for work, token, logprob in zip(
                sampling_seqs, out.token_ids, out.logprobs, strict=True
            ):
                sampled[work.request_id] = SampledToken(token, logprob)
        return StepOutput(step.step_id, sampled, paused.seconds + time.perf_counter() - started)

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
