"""The stage actor: runs model steps on its ModelRunner, on the engine's model thread (off the
event loop), and samples.

In one process there is one stage holding every layer and the whole KV cache, so it is also the
last stage: it samples. It keeps, per request, the KV block table (extended by each step's new
blocks) and the sampling state (params and the request's own random generator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from medha.actors.base import Actor
from medha.actors.messages import Forget, ModelStep, SampledToken, StepOutput
from medha.actors.model_thread import ModelThread
from medha.model.runner import ModelRunner, StepSeq
from medha.model.sampler import make_generator, sample
from medha.sampling import SamplingParams


@dataclass(slots=True)
class _SeqState:
    block_table: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None


class StageActor(Actor[ModelStep | Forget]):
    def __init__(self, runner: ModelRunner, thread: ModelThread, name: str = "stage-0") -> None:
        super().__init__(name)
        self.runner = runner
        self.thread = thread
        self._seqs: dict[str, _SeqState] = {}

    async def handle(self, message: ModelStep | Forget) -> StepOutput | None:
        if isinstance(message, Forget):
            self._forget(message.release, message.preempted)
            return None
        # On the model thread, so the event loop keeps streaming tokens and accepting requests
        # meanwhile. torch releases the GIL inside its kernels.
        return await self.thread.run(self.run_step, message)

    def run_step(self, step: ModelStep) -> StepOutput:
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
        logits = self.runner.step(batch)
        sampling_seqs = [w for w in step.seqs if w.samples]
        sampled: dict[str, SampledToken] = {}
        if sampling_seqs:
            states = [self._seqs[w.request_id] for w in sampling_seqs]
            out = sample(logits, [s.sampling for s in states], [s.generator for s in states])
            for work, token, logprob in zip(
                sampling_seqs, out.token_ids, out.logprobs, strict=True
            ):
                sampled[work.request_id] = SampledToken(token, logprob)
        return StepOutput(step.step_id, sampled, time.perf_counter() - started)

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
