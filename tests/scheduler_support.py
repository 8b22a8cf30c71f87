"""Test support for the scheduler: an analytic toy cost model and a discrete-event driver that
plays the engine (schedule, stage 0 done, step done, aborts) against a fake clock, checking
the plan invariants on every iteration."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import pytest

from medha.scheduler import (
    BatchPlan,
    RequestStatus,
    SchedRequest,
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SeqKind,
    SeqShape,
)
from medha.scheduler.kvp import KvpLayout
from medha.scheduler.policies import ChunkingMode, policy_for


@dataclass(frozen=True)
class ToyCost:
    """time = a + b * sum(q) + c * sum(q * (kv / n + q / 2)) + d * sum(kv / n) + e * sum(rows).

    Defaults: a 100K-token prompt takes ~10 s alone, a 1K-token one ~26 ms; a 50 ms budget
    fits ~2200 fresh tokens or ~270 tokens at 90K context.
    """

    overhead: float = 0.005
    per_token: float = 2e-5
    per_attention: float = 1.6e-9
    per_kv_read: float = 1e-8
    linear_floor: float = 0.0
    """Weight-streaming floor of the linear layers: below floor / per_token query tokens a batch
    costs the same (a roofline's memory-bound regime); 0 makes the model purely additive."""
    per_head_row: float = 0.0
    """The LM head's cost per row (SeqShape.head_rows, additive like the roofline model's): a
    scored prompt's chunk pays it on every row, and the sampling KVP group for every
    sequence."""
    pp_stages: int = 1
    iteration_budget: float | None = None
    """When set, prefill times include the fixed cost (overhead + floor) of every iteration a
    prompt chunked to this budget needs, as a profiled prefill-time table would."""

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        tokens = 0
        other = 0.0
        for seq in seqs:
            kv = seq.kv_tokens / seq.kvp_groups
            q = seq.q_tokens
            tokens += q
            other += self.per_attention * q * (kv + q / 2) + self.per_kv_read * kv
            other += self.per_head_row * seq.head_rows
        return self.overhead + max(self.linear_floor, self.per_token * tokens) + other

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.batch_time(seqs) / self.pp_stages

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.remaining_prefill_time(0, prompt_tokens)

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        left = prompt_tokens - processed_tokens
        if left <= 0:
            return 0.0
        attention = (prompt_tokens**2 - processed_tokens**2) / 2
        variable = self.per_token * left + self.per_attention * attention
        fixed = self.overhead + self.linear_floor
        one_batch = self.overhead + max(self.linear_floor, self.per_token * left)
        one_batch += self.per_attention * attention
        if self.iteration_budget is None or self.iteration_budget <= fixed:
            return one_batch
        return max(one_batch, variable * self.iteration_budget / (self.iteration_budget - fixed))


@dataclass(frozen=True)
class Arrival:
    request_id: str
    arrival: float
    prompt_len: int
    max_new_tokens: int
    deadline: float | None = None
    stop_after: int | None = None
    """The fake engine reports EOS after this many tokens (None: run to max_new_tokens)."""
    abort_at: float | None = None
    block_hashes: tuple[bytes, ...] = ()
    output_hashes: tuple[bytes, ...] = ()
    """Digests of the blocks its output fills, in order (prefix caching): the fake engine
    hands them to the scheduler as its sampled tokens fill them."""
    scores_prompt: bool = False


@dataclass
class DriverResult:
    finished: dict[str, SchedRequest] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    plans: list[BatchPlan] = field(default_factory=list)
    end_time: float = 0.0

    def ttft(self, request_id: str) -> float:
        value = self.finished[request_id].ttft
        assert value is not None
        return value

    def met(self, request_id: str) -> bool:
        return bool(self.finished[request_id].met_deadline)

    def chunks_of(self, request_id: str) -> list[tuple[int, int]]:
        return [
            (seq.start, seq.end)
            for plan in self.plans
            for seq in plan.seqs
            if seq.request_id == request_id and seq.kind is SeqKind.PREFILL
        ]


class PlanChecker:
    """Plays the engine's KV bookkeeping and asserts the invariants of every plan."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.config = scheduler.config
        self.owner: dict[tuple[int, int], set[str]] = {}
        """Who holds each block: several requests only for a prefix cache hit."""
        self.content: dict[tuple[int, int], bytes | None] = {}
        """What each block holds once a plan that filled it has completed: its prompt prefix
        digest, or None (private)."""
        self.written: dict[int, dict[tuple[int, int], bytes | None]] = {}
        """What each plan in flight fills, recorded in `content` when it completes (a block
        shared before then would be read before it holds its KV)."""
        self.tables: dict[str, dict[int, list[int]]] = {}
        self.in_flight_ids: dict[int, set[str]] = {}
        for request in scheduler.table.running.values():  # a scheduler stepped by hand before
            for group, blocks in zip(request.groups, request.block_tables, strict=True):
                self.tables.setdefault(request.request_id, {})[group] = list(blocks)
                for block in blocks:
                    self.owner.setdefault((group, block), set()).add(request.request_id)

    def ready_decodes(self) -> set[str]:
        return {
            r.request_id
            for r in self.scheduler.table.running.values()
            if r.status is RequestStatus.DECODING and r.tokens_left == 1
        }

    def drop(self, request_id: str) -> None:
        for group, blocks in self.tables.pop(request_id, {}).items():
            for block in blocks:
                owners = self.owner[(group, block)]
                owners.remove(request_id)
                if not owners:
                    del self.owner[(group, block)]

    def check(self, plan: BatchPlan, ready: set[str], could_issue: bool) -> None:
        config = self.config
        for request_id in (*plan.released, *plan.preempted):
            self.drop(request_id)
        table = self.scheduler.table
        assert set(table.prefilling) == {
            r.request_id for r in table.running.values() if r.status is RequestStatus.PREFILLING
        }, "the prefilling index disagrees with the running requests"
        if plan.is_empty:
            return
        assert could_issue, "a plan was issued while stage 0 was busy or the pipeline full"
        assert len(plan.seqs) <= config.max_batch_size
        ids = [seq.request_id for seq in plan.seqs]
        assert len(ids) == len(set(ids)), "a request appears twice in one plan"
        if not config.pipelined:
            busy = set().union(*self.in_flight_ids.values()) if self.in_flight_ids else set()
            assert not busy & set(ids), "without SPP a request is in at most one plan in flight"
        self.in_flight_ids[plan.plan_id] = set(ids)
        kinds = [seq.kind for seq in plan.seqs]
        assert kinds == sorted(kinds, key=lambda kind: kind is SeqKind.PREFILL), "decodes first"
        decodes = {seq.request_id for seq in plan.seqs if seq.kind is SeqKind.DECODE}
        for request_id in ready - decodes - set(plan.preempted):
            self._assert_blocked_on_memory(request_id)
        for seq in plan.seqs:
            self._check_seq(plan, seq)
        # Every group's work was priced: the plan takes as long as its slowest group.
        slowest = max(self.scheduler.cost.batch_time(s) for s in plan.group_shapes().values())
        assert plan.predicted_time == pytest.approx(slowest), "a group's work was not priced"

    def _assert_blocked_on_memory(self, request_id: str) -> None:
        request = self.scheduler.get(request_id)
        assert request is not None
        layout = self.scheduler.table.layout
        group = layout.group_needing_block(request, request.known_tokens - 1)
        assert group is not None and self.scheduler.table.pool.num_free(group) == 0, (
            f"ready decode {request_id} was left out of the batch"
        )

    def _check_seq(self, plan: BatchPlan, seq: ScheduledSeq) -> None:
        config = self.config
        request = self.scheduler.get(seq.request_id)
        assert request is not None
        # The decode loop builds these tuples with tuple.__new__, which checks no field count.
        assert len(seq) == len(type(seq)._fields)
        assert all(len(shard) == len(type(shard)._fields) for shard in seq.shards)
        assert seq.end > seq.start >= 0
        # The LM head runs on one row, or on each row of a scored prompt not scored before.
        if seq.kind is SeqKind.DECODE or not request.scores_prompt:
            assert seq.head_rows == 1
        elif request.num_preemptions == 0 and seq.end <= request.prompt_len:
            assert seq.head_rows == seq.q_tokens
        else:
            assert 1 <= seq.head_rows <= seq.q_tokens
        limit = config.max_tokens_per_kvp_group
        if limit is not None:
            assert seq.start // limit == (seq.end - 1) // limit, "chunk straddles a KVP boundary"
            assert len(seq.shards) == seq.start // limit + 1
        assert seq.shards[-1].end == seq.start
        assert sum(shard.tokens for shard in seq.shards) == seq.start
        if seq.kind is SeqKind.DECODE:
            assert seq.q_tokens == 1 and seq.samples
        else:
            self._check_chunk_size(seq.q_tokens, seq.end, request.known_tokens, seq.start)
        assert seq.samples == (seq.end == request.known_tokens)
        table = self.tables.setdefault(seq.request_id, {})
        size = config.block_size
        per_group = (limit or 0) // size
        first_step = not table
        if first_step:
            # A prefix cache hit skips only whole blocks, and never the last known token.
            assert seq.start % size == 0 and seq.start < request.known_tokens
        for group, blocks in seq.new_blocks:
            group_index = request.groups.index(group)
            for local, block in enumerate(blocks, start=len(table.get(group, []))):
                key = (group, block)
                index = group_index * per_group + local
                assert 0 <= block < config.num_blocks
                if first_step and index < seq.start // size:
                    assert self.content.get(key) == request.block_hashes[index], (
                        f"block {key} reused for another prefix"
                    )
                else:
                    assert key not in self.owner, f"block {key} handed out twice"
                    self.content.pop(key, None)
                self.owner.setdefault(key, set()).add(seq.request_id)
            table.setdefault(group, []).extend(blocks)
        # The appending group must hold blocks for every position the step writes, and hold
        # them alone (nobody writes into a shared block); a block it fills now holds its prompt
        # prefix (or private tokens).
        shard = seq.shards[-1]
        own = table.get(shard.group, [])
        assert len(own) * size >= seq.end - shard.start
        for local in range((seq.start - shard.start) // size, -(-(seq.end - shard.start) // size)):
            key = (shard.group, own[local])
            assert self.owner[key] == {seq.request_id}, f"step writes into shared block {key}"
            index = shard.start // size + local
            if (local + 1) * size <= seq.end - shard.start:
                hashes = request.block_hashes
                written = self.written.setdefault(plan.plan_id, {})
                written[key] = hashes[index] if index < len(hashes) else None

    def _check_chunk_size(self, q: int, end: int, known: int, start: int) -> None:
        config = self.config
        limit = config.max_tokens_per_kvp_group
        stops_early = end == known or (limit is not None and end % limit == 0)
        chunking = policy_for(config.policy).chunking
        if chunking is ChunkingMode.ADAPTIVE:
            assert q <= config.max_chunk
            assert stops_early or (q >= config.min_chunk and q % config.chunk_multiple == 0)
        elif chunking is ChunkingMode.FIXED:
            assert q <= max(config.fixed_chunk, config.min_chunk)
        else:
            assert stops_early, "non-preemptive FCFS prefilled part of a prompt"

    def plan_done(self, plan: BatchPlan) -> None:
        self.in_flight_ids.pop(plan.plan_id, None)
        self.content.update(self.written.pop(plan.plan_id, {}))
        # Every block in a prefix cache holds, computed, the prefix it is registered under.
        for group, allocator in enumerate(self.scheduler.table.pool.groups):
            for digest, block in allocator.cache.registered():
                assert self.content.get((group, block)) == digest, (
                    f"block {(group, block)} cached before its KV was computed"
                )

    def assert_all_free(self) -> None:
        assert not self.owner, f"blocks still owned: {sorted(set(self.owner.values()))[:5]}"
        stats = self.scheduler.stats()
        assert stats.free_blocks == stats.total_blocks, "block leak"


def drive(
    scheduler: Scheduler,
    arrivals: Sequence[Arrival],
    *,
    now: float = 0.0,
    max_events: int = 2_000_000,
) -> DriverResult:
    """Run every arrival to completion on a fake clock that advances by the predicted times.

    Pipeline model: a plan occupies each of pp stages for its predicted stage time, in order,
    and a stage serves plans in issue order. `now`: the clock to start from (a scheduler that
    was stepped by hand before must have nothing in flight).
    """
    checker = PlanChecker(scheduler)
    result = DriverResult()
    pp = scheduler.config.pp_stages
    stage_free = [0.0] * pp
    counter = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    for arrival in arrivals:
        heapq.heappush(events, (arrival.arrival, next(counter), "arrive", arrival))
        if arrival.abort_at is not None:
            heapq.heappush(events, (arrival.abort_at, next(counter), "abort", arrival.request_id))
    by_id = {a.request_id: a for a in arrivals}
    for _ in range(max_events):
        if events:
            now = _handle_event(scheduler, events, result, checker, by_id)
            if events and events[0][0] <= now:
                continue  # handle every event of this instant before scheduling
        elif not scheduler.has_work:
            break
        stats = scheduler.stats()
        could_issue = not stats.stage0_busy and stats.plans_in_flight < pp
        ready = checker.ready_decodes() if could_issue else set()
        plan = scheduler.schedule(now)
        checker.check(plan, ready, could_issue)
        if plan.is_empty:
            if could_issue and stats.plans_in_flight == 0 and not events:
                assert not scheduler.has_work, "scheduler stalled with work left, nothing running"
            continue
        result.plans.append(plan)
        time = now
        for stage in range(pp):
            time = max(time, stage_free[stage]) + plan.predicted_stage_time
            stage_free[stage] = time
            if stage == 0:
                heapq.heappush(events, (time, next(counter), "stage0", plan))
        heapq.heappush(events, (max(time, now + plan.predicted_time), next(counter), "done", plan))
    else:
        raise AssertionError("driver did not finish within max_events")
    result.end_time = now
    checker.check(scheduler.schedule(now), set(), False)  # flush the last released ids
    checker.assert_all_free()
    assert not scheduler.has_work
    return result


def _handle_event(
    scheduler: Scheduler,
    events: list[tuple[float, int, str, object]],
    result: DriverResult,
    checker: PlanChecker,
    arrivals: dict[str, Arrival],
) -> float:
    now, _, kind, payload = heapq.heappop(events)
    if kind == "arrive":
        assert isinstance(payload, Arrival)
        scheduler.add_request(
            payload.request_id,
            payload.prompt_len,
            payload.max_new_tokens,
            payload.arrival,
            payload.deadline,
            payload.block_hashes,
            payload.scores_prompt,
        )
    elif kind == "abort":
        assert isinstance(payload, str)
        if scheduler.abort(payload):
            result.aborted.add(payload)
    elif kind == "stage0":
        assert isinstance(payload, BatchPlan)
        scheduler.on_stage0_done(payload)
    else:
        assert isinstance(payload, BatchPlan)
        finished = {
            seq.request_id
            for seq in payload.seqs
            if seq.samples
            and (request := scheduler.get(seq.request_id)) is not None
            and (arrival := arrivals.get(seq.request_id)) is not None
            and arrival.stop_after == request.generated + 1
        }
        for request in scheduler.on_step_done(payload, now, finished):
            result.finished[request.request_id] = request
        for seq in payload.seqs:
            if seq.request_id in arrivals:  # not a request added by hand before
                _add_output_hashes(scheduler, arrivals[seq.request_id])
        checker.plan_done(payload)
    return now


def _add_output_hashes(scheduler: Scheduler, arrival: Arrival) -> None:
    """As the engine does after a step: the digests of the blocks the request's output has
    filled since the last step."""
    request = scheduler.get(arrival.request_id)
    if request is None or request.status.is_done or not arrival.output_hashes:
        return
    hashed = len(request.block_hashes) - len(arrival.block_hashes)
    filled = request.known_tokens // scheduler.config.block_size - len(arrival.block_hashes)
    if filled > hashed:
        scheduler.add_block_hashes(arrival.request_id, arrival.output_hashes[hashed:filled])


def make_scheduler(cost: ToyCost | None = None, **overrides: object) -> Scheduler:
    config = SchedulerConfig.model_validate(overrides)
    if cost is None:
        cost = ToyCost(pp_stages=config.pp_stages)
    return Scheduler(config, cost)


def step(
    scheduler: Scheduler, now: float, finished: Collection[str] = ()
) -> tuple[BatchPlan, list[SchedRequest]]:
    """One whole iteration by hand: schedule at `now`, run it, report it done at `now`."""
    plan = scheduler.schedule(now)
    scheduler.on_stage0_done(plan)
    return plan, scheduler.on_step_done(plan, now, finished)


def drive_random_workload(
    config: SchedulerConfig, arrivals: Sequence[Arrival]
) -> tuple[Scheduler, list[Arrival]]:
    """Drive the arrivals that can ever fit `config` to completion (the checker sees every
    plan and asserts no leak at the end), and check each finished with its expected token
    count, never before it arrived, and each aborted one never finished. Returns the
    scheduler and the arrivals driven."""
    layout = KvpLayout(config)
    fitting = [a for a in arrivals if layout.can_ever_fit(a.prompt_len + a.max_new_tokens)]
    cost = ToyCost(per_head_row=2e-5, pp_stages=config.pp_stages)
    scheduler = make_scheduler(cost, **config.model_dump())
    result = drive(scheduler, fitting)
    for arrival in fitting:
        if arrival.request_id in result.aborted:
            assert arrival.request_id not in result.finished
            continue
        request = result.finished[arrival.request_id]
        expected = min(arrival.max_new_tokens, arrival.stop_after or arrival.max_new_tokens)
        assert request.generated == expected
        assert request.first_token_time is not None
        assert request.first_token_time >= arrival.arrival
    return scheduler, fitting
