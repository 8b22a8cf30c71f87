"""Re-walking the prefill-time table off the event loop.

When the online `context_scale` moves by more than 10%, the cost model's prefill table must be
walked again: chunk by chunk, as adaptive chunking would cut a lone prompt, out to the longest
prompt the engine takes. That walk is pure Python and grows with the context: on this 2-core
machine, SmolLM2 on the CPU profile (0.25 s budget) takes 8 ms to 8K tokens, 98 ms to 128K and
0.75 s to 1M; Llama-3-8B on the H100 profile (50 ms budget) 2 ms, 13 ms and 0.6 s. Done where the
scale moved, on the event loop, it would freeze every stream that long.

So the engine's cost model defers it (`defer_prefill_tables`): the new table is walked on a
thread of its own, the scheduler keeps ranking with the old one meanwhile (off by the 10% the
scale moved at most), and the new table is installed between two iterations, by `poll()`.
The walk holds the GIL while it computes, so the event loop and the model thread still run
during it, at a share of the interpreter; the model's kernels release the GIL.
"""

from __future__ import annotations

import threading

from medha.perf.cost_model import RooflineCostModel
from medha.perf.prefill_table import PrefillTable


class PrefillTableRefresher:
    """Keeps `cost`'s prefill table current without walking it on the caller's thread."""

    def __init__(self, cost: RooflineCostModel, walk_to: int) -> None:
        """`walk_to`: the longest prompt the engine takes (each new table is walked out to it
        before it is installed, so no lookup extends it on the loop)."""
        if walk_to < 1:
            raise ValueError(f"walk_to must be >= 1, got {walk_to}")
        self.cost = cost
        self.walk_to = walk_to
        cost.defer_prefill_tables = True
        self._walk: _Walk | None = None
        self.installed = 0
        """New tables installed so far."""

    def poll(self) -> None:
        """Install a table whose walk has finished (if one is still due), and start the walk
        of a due one. Call it from the thread that schedules, between iterations."""
        walk = self._walk
        if walk is not None:
            if walk.thread.is_alive():
                return
            self._walk = None
            table = walk.result()
            # The scale may have come back near the current table's while this one was walked.
            if self.cost.prefill_table_due is not None:
                self.cost.install_prefill_table(table, walk.context_scale)
                self.installed += 1
        due = self.cost.prefill_table_due
        if due is not None:
            self._walk = _Walk(self.cost.new_prefill_table(due), due, self.walk_to)

    def wait(self) -> None:
        """Wait for a walk in progress to finish (tests; poll() then installs it)."""
        if self._walk is not None:
            self._walk.thread.join()


class _Walk:
    """One table walked out to `walk_to` on a daemon thread (an engine that stops does not wait
    for it)."""

    def __init__(self, table: PrefillTable, context_scale: float, walk_to: int) -> None:
        self.table = table
        self.context_scale = context_scale
        self._error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(walk_to,), name="medha-prefill-table", daemon=True
        )
        self.thread.start()

    def _run(self, walk_to: int) -> None:
        try:
            self.table.prefill_time(walk_to)
        except BaseException as exc:  # handed to poll(), on the scheduling thread
            self._error = exc

    def result(self) -> PrefillTable:
        if self._error is not None:
            raise self._error
        return self.table
