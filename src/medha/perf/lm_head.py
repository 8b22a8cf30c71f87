"""The last stage's LM head: hidden rows to logits over the vocabulary, and what follows them.

Per row (SeqShape.head_rows: the row a sequence may sample from, or every row of a scored
prompt's chunk) the last stage

- multiplies by this rank's shard of the head, `V/tp` columns (a GEMM: its weights are read once
  per call, whatever the rows);
- casts the logits to fp32 (unless the model runs in fp32);
- all-gathers them across the TP ranks, each of which then holds the whole vocabulary;
- reads them once more: the sampler, or prompt scoring's log-normaliser.

For a decode's one row that traffic is nothing beside the weights; a scored chunk of 2,048 rows
of Llama-3 (128K vocabulary) moves a gigabyte of fp32 logits, more than its matmul takes on a
GPU at tp 8.
"""

from __future__ import annotations

import math

from medha.perf.hardware import DeviceProfile
from medha.perf.roofline import Terms, allgather_wire_bytes, linear_work

FP32_BYTES = 4


class LmHeadCost:
    """The ideal terms of the LM head and its logits on one rank, for any number of rows."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        profile: DeviceProfile,
        tp: int,
        dtype_bytes: int,
        tp_link: tuple[float, float],
    ) -> None:
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.profile, self.tp, self.dtype_bytes = profile, tp, dtype_bytes
        self.tp_link = tp_link
        self.vocab_shard = math.ceil(vocab_size / tp)
        shard_bytes = self.vocab_shard * (dtype_bytes + FP32_BYTES) if dtype_bytes != 4 else 0
        gathered = vocab_size * FP32_BYTES if tp > 1 else 0
        self.logits_bytes_per_row = shard_bytes + gathered + vocab_size * FP32_BYTES
        """Per row, past the GEMM's own output: the cast, the gathered copy, the last read."""

    def terms(self, rows: int) -> Terms:
        """The head on `rows` rows; the matmul charged to its binding roofline branch."""
        if rows <= 0:
            return Terms()
        p, eff = self.profile, self.profile.efficiency
        work = linear_work(rows, self.hidden_size, self.vocab_shard, self.dtype_bytes)
        matmul = memory = 0.0
        if work.flops / (p.peak_flops * eff.matmul) >= work.bytes / (p.hbm_bandwidth * eff.memory):
            matmul = work.flops / p.peak_flops
        else:
            memory = work.bytes / p.hbm_bandwidth
        memory += rows * self.logits_bytes_per_row / p.hbm_bandwidth
        if self.tp == 1:
            return Terms(matmul=matmul, memory=memory)
        bandwidth, latency = self.tp_link
        wire = allgather_wire_bytes(rows * self.vocab_shard * FP32_BYTES, self.tp)
        return Terms(matmul=matmul, memory=memory, collective=wire / bandwidth, latency=latency)
