"""A batch reduced to the few sums its predicted time depends on, and a pricer built on them.

The linear layers' roofline needs only the batch's total query tokens; attention's binding
branch is chosen per sequence and KVP merges are per sequence, so those add up across the batch.
Adaptive chunking asks "how long would the batch take with this chunk added?" about ten times
per iteration over batches of a hundred decodes: keeping the batch as its sums makes each
question O(1) instead of O(batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.perf.cost_model import RooflineCostModel
    from medha.scheduler.cost import SeqShape


@dataclass(slots=True)
class BatchSums:
    """What one layer's time depends on, summed over a batch's sequences."""

    tokens: int = 0
    seqs: int = 0
    head_rows: int = 0
    """Rows the LM head computes logits for (SeqShape.head_rows, summed)."""
    attention: float = 0.0
    """Ideal seconds per layer of compute-bound attention."""
    kv_read: float = 0.0
    """Ideal seconds per layer of bandwidth-bound attention."""
    merge_bytes: float = 0.0
    """KVP merge bytes on the wire per layer."""
    kv_tokens: float = 0.0
    """Cached KV tokens attended to per layer, on the busiest group (for kv_gather_s)."""

    def copy(self) -> BatchSums:
        return BatchSums(
            self.tokens,
            self.seqs,
            self.head_rows,
            self.attention,
            self.kv_read,
            self.merge_bytes,
            self.kv_tokens,
        )


class RooflinePricer:
    """A batch under construction, priced by a RooflineCostModel (implements
    medha.scheduler.pricing.BatchPricer)."""

    def __init__(self, model: RooflineCostModel) -> None:
        self._model = model
        self._sums = BatchSums()
        self._time: float | None = 0.0

    def add(self, seq: SeqShape) -> None:
        self._model.accumulate(self._sums, seq)
        self._time = None

    def add_decodes(self, kv_tokens: Sequence[int], heads: bool = True) -> None:
        self._model.accumulate_decodes(self._sums, kv_tokens, heads)
        self._time = None

    def time(self) -> float:
        if self._time is None:
            self._time = self._model.batch_seconds(self._sums)
        return self._time

    def stage_time(self) -> float:
        return self._model.stage_seconds(self._sums)

    def time_with(self, seq: SeqShape) -> float:
        sums = self._sums.copy()
        self._model.accumulate(sums, seq)
        return self._model.batch_seconds(sums)
