"""Re-walking the prefill-time table a slice at a time, between iterations.

When the online `context_scale` moves by more than 10%, the cost model's prefill table must be
walked again: chunk by chunk, as adaptive chunking would cut a lone prompt, out to the longest
prompt the engine takes. That walk is pure Python and grows with the context: on this 2-core
machine, SmolLM2 on the CPU profile (0.25 s budget) takes 8 ms to 8K tokens, 98 ms to 128K and
0.75-1.1 s to 1M; Llama-3-8B on the H100 profile (50 ms budget) 2 ms, 13 ms and 0.6 s. Done at
once where the scale moved, on the event loop, it would freeze every stream that long.

A thread does not help: the walk holds the GIL while it computes, and the model thread, which
gives the GIL up inside every torch op, then waits for it after each. A step of small ops ran
~5x slower while a 1M-token walk ran beside it (a scratch measurement during review), so the
freeze would only have become a longer slowdown. Instead the engine's cost model defers the walk
(`defer_prefill_tables`), and each `poll()` between two iterations walks the new table for at most
`slice_seconds` (a few percent of an iteration) and installs it once it reaches the longest
prompt. Meanwhile the scheduler ranks with the old table, off by the 10% the scale moved, or a
little more if it moves on: a 1M-token table is replaced within a few hundred iterations.
"""

from __future__ import annotations

import time

from medha.perf.cost_model import RooflineCostModel
from medha.perf.prefill_table import PrefillTable


class PrefillTableRefresher:
    """Keeps `cost`'s prefill table current, walking a new one in slices of `slice_seconds`."""

    def __init__(self, cost: RooflineCostModel, walk_to: int, slice_seconds: float) -> None:
        """`walk_to`: the longest prompt the engine takes (a new table is installed once it is
        walked out to it, so that no lookup extends it at once); `slice_seconds`: how long one
        `poll()` may walk. Makes `cost` defer its table walks to this refresher."""
        if walk_to < 1:
            raise ValueError(f"walk_to must be >= 1, got {walk_to}")
        if not slice_seconds >= 0:
            raise ValueError(f"slice_seconds must be >= 0, got {slice_seconds}")
        self.cost = cost
        self.walk_to = walk_to
        self.slice_seconds = slice_seconds
        cost.defer_prefill_tables = True
        self._walking: tuple[PrefillTable, float] | None = None
        """The table being walked and the context_scale it walks at."""
        self.installed = 0
        """New tables installed so far."""

    @property
    def walking(self) -> bool:
        return self._walking is not None

    def poll(self) -> None:
        """Walk a due table for at most `slice_seconds` (at least one grid point), and install
        it once it is walked out to `walk_to`. Call it between iterations, on the thread that
        schedules."""
        cost = self.cost
        if cost.prefill_table_due is None:
            # Nothing due, or the scale came back near the table in use: drop any walk.
            self._walking = None
            return
        if self._walking is None:
            self._walking = (cost.new_prefill_table(cost.prefill_table_due), cost.prefill_table_due)
        table, context_scale = self._walking
        if table.walk_toward(self.walk_to, time.perf_counter() + self.slice_seconds):
            self._walking = None
            # If the scale moved on meanwhile it is installed all the same (a drift mostly
            # keeps its direction), and the next table becomes due.
            cost.install_prefill_table(table, context_scale)
            self.installed += 1
