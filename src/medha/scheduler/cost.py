"""The contract between the scheduler and any latency predictor (the cost model in medha.perf,
a calibrated CPU profile, or a toy model in tests).

The scheduler only ever asks these questions; it never sees FLOPs, bytes or hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class SeqShape(NamedTuple):
    """The work one sequence contributes to one iteration.

    A NamedTuple: the scheduler prices every running decode every iteration, and tuples are
    the cheapest immutable records Python builds."""

    q_tokens: int
    """Query tokens this step: a prefill chunk's length, or 1 for a decode; 0 for the LM-head
    rows of a sequence another KVP group ran (`head_only`)."""
    kv_tokens: int
    """Tokens already in the KV cache that the queries attend to (besides themselves) on the
    KVP group priced: all of them when the sequence lives on one group, else that group's
    shard (`medha.scheduler.kvp.shard_sizes`)."""
    kvp_groups: int = 1
    """KVP groups the sequence's KV is spread over: each reads its own shard, in parallel, and
    their partial outputs then merge."""
    head_rows: int = 1
    """Rows of its hidden states the LM head turns into logits on the group priced: one (every
    sequence is charged the row it may sample from), or every query row of a prefill chunk whose
    prompt is scored (SamplingParams.prompt_logprobs); 0 on a group other than the one that
    samples (medha.scheduler.plan.SAMPLING_GROUP), which runs the head for it."""


def head_only(rows: int) -> SeqShape:
    """What a sequence costs the sampling KVP group when it runs on others: its LM-head rows,
    whose final hidden states the group that ran it sends there (no layer runs them)."""
    return SeqShape(0, 0, 1, rows)


class BatchCostModel(Protocol):
    """Predicts how long things take on one model replica (TP x PP x KVP)."""

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        """Seconds for one batch to traverse the whole model (every pipeline stage)."""
        ...

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        """Seconds the batch occupies ONE pipeline stage (= batch_time when pp == 1).

        With SPP the next micro-batch may enter stage 0 after this long.
        """
        ...

    def prefill_time(self, prompt_tokens: int) -> float:
        """Seconds to prefill a whole prompt alone on an idle replica (the paper's w_total)."""
        ...

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        """Seconds of prefill work left once `processed_tokens` of the prompt are cached."""
        ...
