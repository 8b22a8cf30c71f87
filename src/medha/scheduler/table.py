"""RequestTable: every request the scheduler knows, its state transitions and its KV blocks.

State machine (terminal states in capitals):

    waiting --start--> prefilling --last chunk sampled--> decoding --EOS / max tokens--> FINISHED
       ^                   |                                  |
       +---- preempted <---+--------- preempt (recompute) ----+
    any live state --abort--> ABORTED

Blocks are released exactly once, when a request is done AND no plan in flight refers to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from medha.scheduler.blocks import BlockPool
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import BatchCostModel
from medha.scheduler.kvp import KvpLayout
from medha.scheduler.request import RequestStatus, SchedRequest

NewBlocks = tuple[tuple[int, tuple[int, ...]], ...]


class RequestTable:
    """Queued and running requests plus the block pool they draw from."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.layout = KvpLayout(config)
        self.pool = BlockPool(config.kvp_groups, config.num_blocks, config.check_blocks)
        self.requests: dict[str, SchedRequest] = {}
        """Every request not done yet, plus done ones a plan in flight still refers to."""
        self.queued: dict[str, SchedRequest] = {}
        """Waiting or preempted: no KV blocks. In arrival order (`SchedRequest.order`)."""
        self.running: dict[str, SchedRequest] = {}
        """Prefilling or decoding, oldest start first."""
        self.prefilling: dict[str, SchedRequest] = {}
        """The prefilling part of `running`: a handful among hundreds of decodes, which every
        iteration ranks and sums without walking the decodes."""
        self.released: list[str] = []
        """Requests whose blocks were freed since the last plan was built."""
        self.num_finished = 0
        self.num_aborted = 0
        self.num_preemptions = 0
        self.prefix_hit_blocks = 0
        """Blocks requests took from the prefix cache at their first start, instead of
        computing them (a preempted request finding its own blocks again is not a hit)."""
        self._next_start = 0

    def add(self, request: SchedRequest) -> None:
        self.requests[request.request_id] = request
        self.queued[request.request_id] = request

    def start(
        self, request: SchedRequest, first_group: int, now: float, hit: Sequence[int] = ()
    ) -> NewBlocks:
        """Move a queued request to prefilling and reserve KV for its whole prefill, whose
        first blocks are `hit` (from the prefix cache: computed already)."""
        del self.queued[request.request_id]
        self.running[request.request_id] = request
        self.prefilling[request.request_id] = request
        request.status = RequestStatus.PREFILLING
        request.prefill_len = request.known_tokens
        request.start_order = self._next_start
        self._next_start += 1
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        if not request.num_preemptions:
            self.prefix_hit_blocks += len(hit)
        new_blocks = self.layout.reserve(request, first_group, self.pool, hit)
        request.issued = request.stage0 = request.computed = len(hit) * self.layout.block_size
        # Its work counted while it waited may have assumed another hit (remaining_prefill_s).
        request._remaining_cache_at = -1
        request.key_cursor = -1
        return new_blocks

    def preempt(self, request: SchedRequest) -> None:
        """Evict a running request: free all its KV; it will recompute everything it knows."""
        del self.running[request.request_id]
        self.prefilling.pop(request.request_id, None)
        self.layout.release(request, self.pool)
        request.reset_progress()
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        last = next(reversed(self.queued.values()), None)
        self.queued[request.request_id] = request
        if last is not None and last.order > request.order:
            # Back in its arrival place (preemption is rare; ranking relies on the order).
            self.queued = dict(sorted(self.queued.items(), key=lambda item: item[1].order))

    def queued_by_arrival(self) -> list[SchedRequest]:
        return list(self.queued.values())

    def record_token(self, request: SchedRequest, now: float, stop: bool) -> bool:
        """A step of `request` sampled a token. Returns True when that ends the request."""
        request.generated += 1
        self.prefilling.pop(request.request_id, None)  # its prefill ended with this token
        if request.first_token_time is None:
            request.first_token_time = now
        if stop or request.generated >= request.max_new_tokens:
            del self.running[request.request_id]
            request.status = RequestStatus.FINISHED
            request.finish_time = now
            self.num_finished += 1
            self.retire_if_idle(request)
            return True
        request.status = RequestStatus.DECODING
        return False

    def abort(self, request: SchedRequest) -> None:
        self.queued.pop(request.request_id, None)
        self.running.pop(request.request_id, None)
        self.prefilling.pop(request.request_id, None)
        request.status = RequestStatus.ABORTED
        self.num_aborted += 1
        self.retire_if_idle(request)

    def retire_if_idle(self, request: SchedRequest) -> None:
        """Forget a done request and free its blocks once no plan in flight refers to it."""
        if request.in_flight:
            return
        del self.requests[request.request_id]
        placed = bool(request.groups)
        if placed:
            self.layout.release(request, self.pool)
        if placed or request.num_preemptions:
            # The stages know it (a preempted request keeps its sampling state there): tell
            # them to forget it.
            self.released.append(request.request_id)

    def take_released(self) -> tuple[str, ...]:
        released = tuple(self.released)
        self.released.clear()
        return released

    def pending_work(self, cost: BatchCostModel) -> list[tuple[float, int]]:
        """Per KVP group: (predicted prefill seconds still to issue, resident requests)."""
        seconds = [0.0] * self.layout.num_groups
        residents = [0] * self.layout.num_groups
        for request in self.prefilling.values():
            remaining = request.remaining_prefill_s(cost)
            for group in request.groups:
                seconds[group] += remaining
        for request in self.running.values():
            for group in request.groups:
                residents[group] += 1
        return list(zip(seconds, residents, strict=True))

    def add_pending(
        self, work: list[tuple[float, int]], request: SchedRequest, cost: BatchCostModel
    ) -> None:
        remaining = request.remaining_prefill_s(cost)
        for group in request.groups:
            seconds, residents = work[group]
            work[group] = (seconds + remaining, residents + 1)
