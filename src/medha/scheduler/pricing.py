"""Pricing a batch while it is being built.

Adaptive chunking asks "how long would this group's batch take with a c-token chunk added?"
for several c per prefill, every iteration, over batches that already hold every running decode.
Re-pricing the whole list each time costs O(batch) per question. A cost model may offer
`batch_pricer()`: an object that keeps the batch in whatever form makes that question cheap
(medha.perf's roofline model keeps a handful of sums, so each question is O(1)). Cost models
without it (toy models in tests) get `ListPricer`, which re-prices the list but still remembers
the price of the batch as it stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from medha.scheduler.cost import BatchCostModel, SeqShape


class BatchPricer(Protocol):
    """One batch under construction: `time()` equals `cost.batch_time(seqs added so far)`, and
    0.0 while nothing was added."""

    def add(self, seq: SeqShape) -> None: ...

    def add_decodes(self, kv_tokens: Sequence[int], heads: bool = True) -> None:
        """`add(SeqShape(1, kv, 1, 1 if heads else 0))` for each kv: the decodes of requests on
        one KVP group, in bulk (once per group per iteration rather than once per decode);
        `heads` False on a group whose LM-head rows another group runs."""
        ...

    def time(self) -> float: ...

    def stage_time(self) -> float:
        """`cost.stage_time(seqs added so far)`."""
        ...

    def time_with(self, seq: SeqShape) -> float:
        """Predicted time of the batch with `seq` added (the batch itself is unchanged)."""
        ...


class ListPricer:
    """Generic pricer for any BatchCostModel: keeps the list and re-prices it."""

    def __init__(self, cost: BatchCostModel) -> None:
        self._cost = cost
        self._seqs: list[SeqShape] = []
        self._time: float | None = 0.0

    def add(self, seq: SeqShape) -> None:
        self._seqs.append(seq)
        self._time = None

    def add_decodes(self, kv_tokens: Sequence[int], heads: bool = True) -> None:
        rows = 1 if heads else 0
        self._seqs.extend(SeqShape(1, kv, 1, rows) for kv in kv_tokens)
        self._time = None

    def time(self) -> float:
        if self._time is None:
            self._time = self._cost.batch_time(self._seqs)
        return self._time

    def stage_time(self) -> float:
        return self._cost.stage_time(self._seqs)

    def time_with(self, seq: SeqShape) -> float:
        return self._cost.batch_time([*self._seqs, seq])


def new_pricer(cost: BatchCostModel) -> BatchPricer:
    """The cost model's own pricer if it offers one, else a ListPricer."""
    make = getattr(cost, "batch_pricer", None)
    pricer: BatchPricer = make() if make is not None else ListPricer(cost)
    return pricer
