"""Requests that wait for a prefix another request is computing.

Prefix caching shares only blocks whose KV is computed. Without more, requests that arrive
together with the same long prefix (an agent's parallel calls over one document, several
questions sent at once) would each compute it whenever the budget has room for more than one
chunk: N times the work, and no sooner for any of them, since they share the same compute. So
a queued request whose next uncached block is the next block a started prefill computes waits
instead, and takes the shared part from the cache once computed (SGLang's scheduler holds back
requests sharing an in-batch prefix the same way).

- It waits only for a shared part that would take it at least an iteration (the target batch
  time) to compute itself: waiting costs it at most the rest of the computing prefill's
  iteration, which an urgent request with a short shared part (a system prompt) would rather
  spend computing that part itself, pausing the iteration if need be.
- While it waits, the prefill it waits for ranks no lower than it (priority inheritance): an
  urgent request is not held back by the slack of the one computing its prefix. Pausing an
  iteration, and choosing a prefill to preempt, count the waiters of its prefills too.
- It waits only while that prefill is running and still computing the shared part; anything
  else that stops it (its end, an abort, a preemption) lets the waiting request start.
- LARS only (`PriorityPolicy.shares_prefixes_in_flight`): the baselines keep the order their
  definitions give.
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

    def __init__(
        self, table: RequestTable, cost: BatchCostModel, min_wait_s: float, enabled: bool
    ) -> None:
        self.table = table
        self.cost = cost
        self.min_wait_s = min_wait_s
        self.enabled = enabled
        # Off: nobody computes anything anybody waits for.
        self._computing: dict[bytes, list[SchedRequest]] | None = None if enabled else {}
        """The started prefills still computing digests, by the digest of their first block
        (a waiter shares at least that one). Built when first needed."""
        self._decided: dict[str, SchedRequest | None] = {}
        self._wait_ends: dict[str, int | None] = {}

    def computer_of(self, request: SchedRequest) -> SchedRequest | None:
        """The started prefill queued `request` waits for, if any."""
        hashes = request.block_hashes
        if not hashes or not request.reads_cache:
            return None
        candidates = self._computing_by_first().get(hashes[0])
        if not candidates:
            return None
        if request.request_id in self._decided:
            return self._decided[request.request_id]
        decided = self._find_computer(request, candidates)
        self._decided[request.request_id] = decided
        return decided

    def holds(self, request: SchedRequest) -> bool:
        """Whether queued `request` should wait for a started prefill (`computer_of`)."""
        return self.computer_of(request) is not None

    def waiters(self, queued: list[SchedRequest]) -> dict[str, list[SchedRequest]]:
        """The requests of `queued` that wait, by the id of the prefill they wait for."""
        if not self._computing_by_first():
            return {}
        waiting: dict[str, list[SchedRequest]] = {}
        for request in queued:
            computing = self.computer_of(request)
            if computing is not None:
                waiting.setdefault(computing.request_id, []).append(request)
        return waiting

    def inherit(
        self, started: list[Ranked], queued: list[SchedRequest], queued_keys: list[float]
    ) -> None:
        """Lower the key of each started prefill in `started` to that of the most urgent
        queued request waiting for it."""
        firsts = self._computing_by_first()
        if not started or not queued or not firsts:
            return
        best: dict[str, float] = {}
        for request, key in zip(queued, queued_keys, strict=True):
            # Inline, the check most requests stop at (a pass may walk 1,000 of them).
            hashes = request.block_hashes
            if not hashes or hashes[0] not in firsts:
                continue
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
        if self.enabled and request.registered_blocks < len(request.block_hashes):
            same_start = self._computing_by_first().setdefault(request.block_hashes[0], [])
            if request not in same_start:  # (the list may have been built after it started)
                same_start.append(request)
            self._decided.clear()  # a request found waiting for nobody may wait for this one

    def _find_computer(
        self, request: SchedRequest, candidates: list[SchedRequest]
    ) -> SchedRequest | None:
        hashes = request.block_hashes
        # Its last token's block is never taken from the cache: no reason to wait for it.
        usable = min(len(hashes), (request.known_tokens - 1) // self.table.layout.block_size)
        for computing in candidates:
            index = computing.registered_blocks  # the next block it computes
            theirs = computing.block_hashes
            if index >= usable or hashes[index] != theirs[index]:
                continue
            if self._cached_anywhere(hashes[index]):
                return None  # another request computed it: it need not wait for this one
            # Chained digests: equal at block i, the two share every token up to its end.
            end = self._worth_waiting_to(computing)
            if end is not None and end <= usable and hashes[end - 1] == theirs[end - 1]:
                return computing
            return None
        return None

    def _worth_waiting_to(self, computing: SchedRequest) -> int | None:
        """The fewest leading blocks of `computing` a waiter must share with it for the
        shared part left to compute to take at least `min_wait_s` (None: no sharing does)."""
        if computing.request_id in self._wait_ends:
            return self._wait_ends[computing.request_id]
        size = self.table.layout.block_size
        start = computing.registered_blocks * size
        low, high = computing.registered_blocks + 1, len(computing.block_hashes)

        def enough(end: int) -> bool:
            return self.cost.remaining_prefill_time(start, end * size) >= self.min_wait_s

        found: int | None = None
        if enough(high):
            while low < high:  # the work grows with the shared length: bisect it
                middle = (low + high) // 2
                if enough(middle):
                    high = middle
                else:
                    low = middle + 1
            found = low
        self._wait_ends[computing.request_id] = found
        return found

    def _cached_anywhere(self, digest: bytes) -> bool:
        return any(group.cache.lookup(digest) is not None for group in self.table.pool.groups)

    def _computing_by_first(self) -> dict[bytes, list[SchedRequest]]:
        if self._computing is None:
            self._computing = {}
            for request in self.table.prefilling.values():
                if request.registered_blocks < len(request.block_hashes):
                    self._computing.setdefault(request.block_hashes[0], []).append(request)
        return self._computing
