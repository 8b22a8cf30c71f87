"""Requests that wait for a prefix another request is computing.

Prefix caching shares only blocks whose KV is computed. Without more, requests that arrive
together with the same long prefix (an agent's parallel calls over one document, several
questions sent at once) would each compute it: N times the work, and no sooner for any of
them, since they share the same compute. So a queued request whose next uncached block is the
next block a started prefill computes waits instead, and takes the shared part from the cache
once computed (SGLang's scheduler holds back requests sharing an in-batch prefix the same way).

- It waits only for a shared part that would take it at least an iteration (the target batch
  time) to compute itself: waiting costs it at most the rest of the computing prefill's
  iteration, which an urgent request with a short shared part (a system prompt) would rather
  spend computing that part itself, pausing the iteration if need be.
- While it waits, the prefill it waits for ranks no lower than it (priority inheritance): an
  urgent request is not held back by the slack of the one computing its prefix.
- It waits only while that prefill is running and still computing the shared part; anything
  else that stops it (its end, an abort, a preemption) lets the waiting request start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.scheduler.cost import BatchCostModel
    from medha.scheduler.ranking import Ranked
    from medha.scheduler.request import SchedRequest
    from medha.scheduler.table import RequestTable


class SharedPrefixGate:
    """For one scheduling pass: which queued requests wait for a started prefill, and the
    priority that prefill inherits from them."""

    def __init__(self, table: RequestTable, cost: BatchCostModel, min_wait_s: float) -> None:
        self.table = table
        self.cost = cost
        self.min_wait_s = min_wait_s
        self._computing: list[tuple[int, bytes, SchedRequest]] | None = None
        """(index, digest, request) of the next block each started prefill computes; built
        when first needed (most passes have no queued request with digests)."""

    def computer_of(self, request: SchedRequest) -> SchedRequest | None:
        """The started prefill queued `request` waits for, if any."""
        hashes = request.block_hashes
        if not hashes:
            return None
        size = self.table.layout.block_size
        # Its last token's block is never taken from the cache: no reason to wait for it.
        usable = min(len(hashes), (request.known_tokens - 1) // size)
        for index, digest, computing in self._computing_blocks():
            # Chained digests: equal at `index`, the two share every token up to its end, and
            # the blocks before it are cached (the computing request holds them).
            if index < usable and hashes[index] == digest and computing is not request:
                shared = index + 1
                theirs = computing.block_hashes
                while shared < min(usable, len(theirs)) and hashes[shared] == theirs[shared]:
                    shared += 1
                work = self.cost.remaining_prefill_time(index * size, shared * size)
                return computing if work >= self.min_wait_s else None
        return None

    def holds(self, request: SchedRequest) -> bool:
        """Whether queued `request` should wait for a started prefill (`computer_of`)."""
        return self.computer_of(request) is not None

    def inherit(
        self, started: list[Ranked], queued: list[SchedRequest], queued_keys: list[float]
    ) -> None:
        """Lower the key of each started prefill in `started` to that of the most urgent
        queued request waiting for it."""
        if not started or not queued or not self._computing_blocks():
            return
        best: dict[str, float] = {}
        for request, key in zip(queued, queued_keys, strict=True):
            computing = self.computer_of(request)
            if computing is not None:
                request_id = computing.request_id
                best[request_id] = min(key, best.get(request_id, key))
        if best:
            started[:] = [
                (min(key, best.get(r.request_id, key)), order, r) for key, order, r in started
            ]

    def started(self, request: SchedRequest) -> None:
        """`request` was started in this pass: later ones with its prefix wait for it."""
        blocks = self._computing_blocks()
        if request.registered_blocks < len(request.block_hashes):
            index = request.registered_blocks
            blocks.append((index, request.block_hashes[index], request))

    def _computing_blocks(self) -> list[tuple[int, bytes, SchedRequest]]:
        if self._computing is None:
            self._computing = [
                (
                    request.registered_blocks,
                    request.block_hashes[request.registered_blocks],
                    request,
                )
                for request in self.table.prefilling.values()
                if request.registered_blocks < len(request.block_hashes)
            ]
        return self._computing
