"""The stage actor of a worker process: runs its stage of every step, in order, off the RPC threads.

RPC handlers only enqueue (`submit` returns a torch Future at once); one step thread runs the
steps strictly in `seq_no` order, because every worker of a group must enter the same
collectives in the same order, whatever order the RPCs arrived in. Per request it keeps this KVP
group's block table and, on the sampling rank, the sampling state.

Stage 0 embeds the tokens; later stages receive the previous stage's hidden states; every stage
but the last sends its output on (isend: the stage is free for the next micro-batch as soon as
its own work is done, which is what SPP needs) and reports done at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medha.actors.messages import SampledToken, StepOutput, sampled_tokens
from medha.actors.prompt_scores import score_prompts
from medha.kernels import AttentionFn, AttentionMetadata
from medha.model.kv_cache import KVCache
from medha.model.prompt_scoring import PromptScores, to_device
from medha.model.request_sampling import RequestSampling, sample_requests
from medha.model.runner import StepSeq
from medha.parallel.kvp import KvpMerge, shard_step_seq
from medha.parallel.messages import ShardStep, ShardWork, StageDone, head_rows
from medha.parallel.stage_model import StageModel


@dataclass(slots=True)
class _SeqState:
    block_table: list[int]
    sampling: RequestSampling | None = None
    """On the sampling rank only."""


class PendingSends:
    """Sends to the next stage still in flight, each with the tensor it reads (freed only once
    the send is done).

    gloo reports an `isend` complete only after it is waited on, so reaping finished sends by
    polling kept every hidden state ever sent (16 KiB per prompt token for Llama-3-8B in fp32).
    So the oldest is waited on once `limit` are pending. With `limit` = pp that never blocks: at
    most pp plans are in flight, so when a stage sends plan i + pp, plan i has left the last
    stage and its send here was received."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._sends: deque[tuple[Any, torch.Tensor]] = deque()

    def add(self, work: Any, tensor: torch.Tensor) -> None:
        while len(self._sends) >= self.limit:
            oldest, _ = self._sends.popleft()
            oldest.wait()
        self._sends.append((work, tensor))

    def __len__(self) -> int:
        return len(self._sends)


class RemoteStage:
    def __init__(
        self,
        rank: int,
        model: StageModel,
        cache: KVCache,
        attention: AttentionFn,
        *,
        prev_rank: int | None,
        next_rank: int | None,
        samples: bool,
        heads: bool,
        kvp_merge: KvpMerge | None,
        device: torch.device,
        pp: int,
        kvp_group: int = 0,
        report_to: int | None = None,
        reporters: dict[int, int] | None = None,
    ) -> None:
        self.rank = rank
        self.model, self.cache, self.attention = model, cache, attention
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.samples = samples
        self.heads = heads
        """Runs the LM head: the last stage of the KVP group that samples (every TP rank)."""
        self.kvp_merge = kvp_merge
        self.kvp_group = kvp_group
        self.report_to = report_to
        """Last stage of another KVP group: the rank of the sampling group it sends the final
        hidden rows of the sequences it reports (its peer there: same TP rank)."""
        self.reporters = reporters or {}
        """Last stage of the sampling group: each other group's rank that reports to it."""
        self.device = device
        self._seqs: dict[str, _SeqState] = {}
        self._queue: dict[int, tuple[ShardStep, torch.futures.Future[StageDone]]] = {}
        self._next = 0
        self._cond = threading.Condition()
        self._sends = PendingSends(limit=pp)
        self._reports = PendingSends(limit=pp)
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"stage-{rank}", daemon=True)
        self._thread.start()

    # -- called on RPC threads ------------------------------------------------------------------

    def submit(self, step: ShardStep) -> torch.futures.Future[StageDone]:
        future: torch.futures.Future[StageDone] = torch.futures.Future()
        with self._cond:
            self._queue[step.seq_no] = (step, future)
            self._cond.notify()
        return future

    # -- the step thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.device.type == "cuda":
            # The current device is per thread, and kernels launched by device-less APIs
            # (Triton) run on it: make it this worker's GPU here, on the step thread.
            torch.cuda.set_device(self.device)
        while True:
            with self._cond:
                while self._next not in self._queue:
                    self._cond.wait()
                step, future = self._queue.pop(self._next)
                self._next += 1
            if self.failure is not None:
                # After a failure the collectives are out of step: refuse everything.
                future.set_exception(RuntimeError(f"worker {self.rank} failed earlier"))
                continue
            try:
                done = self.run(step)
            except BaseException as exc:
                self.failure = exc
                future.set_exception(exc)
            else:
                future.set_result(done)

    def run(self, step: ShardStep) -> StageDone:
        for request_id in step.release:
            self._seqs.pop(request_id, None)
        for request_id in step.preempted:
            state = self._seqs.get(request_id)
            if state is not None:
                state.block_table.clear()
        if not step.seqs and not step.merge_rows:
            return StageDone(step.seq_no, self.rank)
        batch: list[StepSeq] = []
        runs: list[ShardWork] = []
        for work in step.seqs:
            state = self._seqs.get(work.request_id)
            if state is None:
                state = self._seqs[work.request_id] = _SeqState([])
            if work.sampling is not None and self.samples:
                state.sampling = RequestSampling(work.sampling)
            if state.sampling is not None:
                state.sampling.observe(work.start, work.token_ids)
            # Blocks reserved for a later part of the prompt arrive before this group holds any
            # of its KV: keep them all the same.
            state.block_table.extend(work.new_blocks)
            if work.runs:
                batch.append(shard_step_seq(work, state.block_table))
                runs.append(work)
        if self.kvp_merge is not None:
            self.kvp_merge.prepare(runs, step.merge_rows)
        # Queued before the layers, so that the head follows them without a host sync.
        logit_rows = self._logit_rows(step) if self.next_rank is None and self.heads else None
        out: torch.Tensor | None = None
        if batch:
            out, started = self._forward(step, batch)
        else:
            # Nothing of this step runs on this group: it only joins the merges of the others.
            started = time.perf_counter()
            if self.kvp_merge is not None:
                self.kvp_merge.join(len(self.model.layer_range))
        if self.next_rank is not None:
            # Timed before the send: handing the output on is not this stage's compute.
            seconds = self._seconds_since(started)
            if out is not None:  # the next stage runs the same batch, or none
                self._send(out)
            return StageDone(step.seq_no, self.rank, seconds=seconds)
        if not self.heads or not step.seqs:
            # Another KVP group's last stage: the sampling group samples every sequence, and
            # this one sends it the rows it needs of those it ran and the sampling group did not.
            if out is not None:
                self._report(step, runs, out)
            return StageDone(step.seq_no, self.rank, seconds=self._seconds_since(started))
        hidden = self._step_hidden(step, runs, out)
        logits = self.model.head(
            hidden if logit_rows is None else hidden.index_select(0, logit_rows)
        )
        # The sampling rank's TP peers run the LM head on the same rows (a collective).
        scores = score_prompts(
            hidden, step.seqs, self.model.head, self._sampling_of if self.samples else None
        )
        if not self.samples:
            return StageDone(step.seq_no, self.rank, seconds=self._seconds_since(started))
        return self._sample(step, logits, scores, started)

    def _report(self, step: ShardStep, runs: list[ShardWork], out: torch.Tensor) -> None:
        """Send the sampling group the final hidden rows its LM head reads of the sequences
        this group reports (ShardWork.reporter), in step order."""
        rows: list[int] = []
        offset = 0
        for work in runs:
            if work.reporter == self.kvp_group:
                rows.extend(offset + row for row in head_rows(work, step.all_logits))
            offset += len(work.token_ids)
        if rows:
            assert self.report_to is not None
            tensor = out.index_select(0, to_device(rows, self.device)).contiguous()
            self._reports.add(dist.isend(tensor, dst=self.report_to), tensor)

    def _step_hidden(
        self, step: ShardStep, runs: list[ShardWork], out: torch.Tensor | None
    ) -> torch.Tensor:
        """The final hidden states of every sequence of the step, in step order (the sampling
        group's): its own output, with the rows the LM head reads of the sequences other
        groups ran received from them (other rows stay zero: nothing reads them)."""
        if len(runs) == len(step.seqs):
            assert out is not None
            return out
        total = sum(len(work.token_ids) for work in step.seqs)
        dtype = self.cache.k[0].dtype
        hidden = torch.zeros(total, self.model.arch.hidden_size, dtype=dtype, device=self.device)
        own: list[int] = []
        received: dict[int, list[int]] = {}
        offset = 0
        for work in step.seqs:
            count = len(work.token_ids)
            if work.runs:
                own.extend(range(offset, offset + count))
            elif work.reporter is not None:
                rows = received.setdefault(work.reporter, [])
                rows.extend(offset + row for row in head_rows(work, step.all_logits))
            offset += count
        if out is not None:
            hidden.index_copy_(0, to_device(own, self.device), out)
        for group in sorted(received):
            rows = received[group]
            if not rows:
                continue
            part = torch.empty(len(rows), hidden.shape[1], dtype=dtype, device=self.device)
            dist.recv(part, src=self.reporters[group])
            hidden.index_copy_(0, to_device(rows, self.device), part)
        return hidden

    def _seconds_since(self, started: float) -> float:
        """Compute time of this step so far: on CUDA once this thread's stream has run what
        it queued (its stream only: a device-wide sync would also wait for NCCL's sends)."""
        self._sync_stream()
        return time.perf_counter() - started

    def _sync_stream(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _forward(self, step: ShardStep, batch: list[StepSeq]) -> tuple[torch.Tensor, float]:
        """This stage's output, and when its inputs were in hand (after the previous stage's
        hidden states arrived: waiting for them is not this stage's time)."""
        meta = self._metadata(batch)
        ids: list[int] = []
        positions: list[int] = []
        for seq in batch:
            ids.extend(seq.token_ids)
            positions.extend(range(seq.start_pos, seq.start_pos + len(seq.token_ids)))
        device = self.device
        pos = torch.tensor(positions, dtype=torch.int64, device=device)
        if self.prev_rank is None:
            inputs = torch.tensor(ids, dtype=torch.int64, device=device)
        else:
            inputs = torch.empty(
                len(ids), self.model.arch.hidden_size, dtype=self.cache.k[0].dtype, device=device
            )
            dist.recv(inputs, src=self.prev_rank)
            # With NCCL the recv only queues a wait on the stream: wait for the data itself
            # before the clock starts, or the previous stage's compute would count as ours.
            self._sync_stream()
        started = time.perf_counter()
        out = self.model(
            inputs, pos, self.cache, meta, self.attention, self.kvp_merge, keep_hidden=True
        )
        return out, started

    def _logit_rows(self, step: ShardStep) -> torch.Tensor | None:
        """Rows of the last stage's hidden states that get logits: every query token's with
        `all_logits` (None), else the sampling rows (the LM head is the largest matmul of a
        small model's prefill)."""
        if step.all_logits:
            return None
        rows, total = [], 0
        for work in step.seqs:
            total += len(work.token_ids)
            if work.samples:
                rows.append(total - 1)
        return to_device(rows, self.device)

    def _sampling_of(self, request_id: str) -> RequestSampling:
        sampling = self._seqs[request_id].sampling
        if sampling is None:
            raise RuntimeError(f"no sampling parameters for {request_id!r}")
        return sampling

    def _metadata(self, batch: list[StepSeq]) -> AttentionMetadata:
        return AttentionMetadata.build(
            q_lens=[len(s.token_ids) for s in batch],
            q_start_pos=[s.start_pos for s in batch],
            kv_lens=[
                s.kv_len
                if s.kv_len is not None
                else s.start_pos + len(s.token_ids) - s.kv_start_pos
                for s in batch
            ],
            kv_start_pos=[s.kv_start_pos for s in batch],
            block_tables=[s.block_table for s in batch],
            block_size=self.cache.block_size,
            appends=[s.appends for s in batch],
            device=self.device,
        )

    def _send(self, hidden: torch.Tensor) -> None:
        tensor = hidden.contiguous()
        self._sends.add(dist.isend(tensor, dst=self.next_rank), tensor)

    def _sample(
        self,
        step: ShardStep,
        logits: torch.Tensor,
        scores: dict[str, PromptScores],
        started: float,
    ) -> StageDone:
        sampling_works = [w for w in step.seqs if w.samples]
        sampled: dict[str, SampledToken] = {}
        if sampling_works:
            if step.all_logits:
                ends, total = [], 0
                for work in step.seqs:
                    total += len(work.token_ids)
                    if work.samples:
                        ends.append(total - 1)
                rows = logits[torch.tensor(ends, device=logits.device)]
            else:
                rows = logits
            requests = [self._sampling_of(work.request_id) for work in sampling_works]
            out = sample_requests(rows, requests, [work.token_mask for work in sampling_works])
            sampled = sampled_tokens([w.request_id for w in sampling_works], out)
        seconds = self._seconds_since(started)
        output = StepOutput(step.step_id, sampled, seconds, scores)
        returned = logits.cpu() if step.return_logits else None
        return StageDone(step.seq_no, self.rank, output, returned, seconds)
