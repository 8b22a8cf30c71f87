"""Scheduler: decides every iteration which decodes and which prefill chunks run.

The engine and the discrete-event simulator drive the same object:

    plan = scheduler.schedule(now)            # decodes first, then prefill chunks by priority
    ...stage 0 finishes...  scheduler.on_stage0_done(plan)
    ...last stage samples... scheduler.on_step_done(plan, now, finished={...})

With one stage, a plan in flight may also pause between layers while newer plans run
(`pause_time`, `on_seqs_done`, `suspend`, `resume`): see docs/scheduler.md, "Pausing an
iteration".

Each request's KV cache catches up with its known tokens under a per-iteration time budget
(the vLLM v1 model); there are no separate prefill and decode phases beyond that. The
scheduler never reads a clock and never touches a tensor.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from medha.errors import InvalidRequestError, RequestTooLargeError
from medha.scheduler.batch import BatchBuilder
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import BatchCostModel
from medha.scheduler.decodes import DecodeScheduler
from medha.scheduler.lead_guard import promote_guarded
from medha.scheduler.pausing import PausedPlans, newcomers_pause_time, ran_alone
from medha.scheduler.plan import BatchPlan, ScheduledSeq, SeqKind, lm_head_rows
from medha.scheduler.policies import ChunkingMode, default_deadline, policy_for, relative_slack
from medha.scheduler.prefix_sharing import SharedPrefixGate
from medha.scheduler.ranking import CandidateOrder
from medha.scheduler.request import (
    SchedRequest,
    check_request_fields,
    extend_block_hashes,
    prefill_work,
)
from medha.scheduler.stats import SchedulerStats
from medha.scheduler.table import NewBlocks, RequestTable


class Scheduler:
    """Pure-Python iteration scheduler: priorities, chunk sizes, KV blocks, KVP placement, SPP."""

    def __init__(self, config: SchedulerConfig, cost: BatchCostModel) -> None:
        self.config = config
        self.cost = cost
        self.policy = policy_for(config.policy)
        self._lead_guard = config.lead_guard and self.policy.priority.lead_guard
        self.table = RequestTable(config)
        self._in_flight: dict[int, BatchPlan] = {}
        self._in_stage0: int | None = None
        self._paused = PausedPlans(config.pause_budget)
        self._decodes = DecodeScheduler(
            self.table, self.policy.priority, cost, self._rank_time, config.target_batch_time
        )
        self._done_early: dict[int, set[str]] = {}
        """Requests of a plan in flight whose sequences finished before the plan (on_seqs_done)."""
        self._next_plan_id = 0
        self._next_order = 0
        self._prefill_version = getattr(cost, "prefill_version", 0)
        """The cost model's prefill level that cached work and keys were computed at (a cost
        model may expose `prefill_version`, bumped when its prefill times change level)."""

    # -- requests in and out ------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_len: int,
        max_new_tokens: int,
        arrival: float,
        deadline: float | None = None,
        block_hashes: Sequence[bytes] = (),
        scores_prompt: bool = False,
    ) -> SchedRequest:
        """Queue a request. `deadline`: seconds after arrival by which its first token is due
        (default: max(1.5 x predicted prefill time, 0.5 s)). `block_hashes`: the chained digests
        of its prompt's full blocks (`medha.scheduler.prefix_cache.block_hashes`), to share
        computed KV with other requests that start the same way; none: no prefix caching.
        `scores_prompt`: it scores its prompt (SchedRequest.scores_prompt).

        Raises InvalidRequestError for bad lengths or a duplicate id, RequestTooLargeError when
        its KV (prompt + max_new_tokens) could never fit the KVP groups it may use.
        """
        if request_id in self.table.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already scheduled")
        check_request_fields(
            request_id, prompt_len, max_new_tokens, arrival, deadline, block_hashes, self.config
        )
        self.check_fits(prompt_len, max_new_tokens, request_id)
        # What it has to compute: past what the prefix cache holds of it now.
        hashes = () if scores_prompt else block_hashes
        cached = self.table.layout.cached_tokens(hashes, prompt_len, self.table.pool)
        total_prefill_s = prefill_work(self.cost, cached, prompt_len, scores_prompt)
        request = SchedRequest(
            request_id=request_id,
            arrival=arrival,
            prompt_len=prompt_len,
            max_new_tokens=max_new_tokens,
            deadline=deadline or default_deadline(total_prefill_s, self.config),
            deadline_given=deadline is not None,
            total_prefill_s=total_prefill_s,
            order=self._next_order,
            block_hashes=tuple(block_hashes),
            scores_prompt=scores_prompt,
            cached_at_arrival=cached,
        )
        self._next_order += 1
        self.policy.priority.refresh(request, self.cost)
        self.table.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state. Returns False if it is unknown or already done.

        Its blocks are freed at once, or, when a plan in flight still writes its KV, as soon as
        the last such plan completes (that plan's results are ignored for it).
        """
        request = self.table.requests.get(request_id)
        if request is None or request.status.is_done:
            return False
        self.table.abort(request)
        return True

    def add_block_hashes(self, request_id: str, digests: Sequence[bytes]) -> None:
        """Digests of a request's next full blocks (prefix caching), as its sampled tokens fill
        them: once computed, they are cached like its prompt's. Ignored once it is done."""
        request = self.table.requests.get(request_id)
        if request is not None and not request.status.is_done:
            extend_block_hashes(request, digests, self.config.block_size)

    def get(self, request_id: str) -> SchedRequest | None:
        """The request with this id, until it is done and no plan in flight refers to it."""
        return self.table.requests.get(request_id)

    @property
    def has_work(self) -> bool:
        """True while some request is queued, running or in flight."""
        return bool(self.table.requests)

    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can ever hold in the KV cache."""
        return self.table.layout.max_request_tokens()

    def check_fits(self, prompt_len: int, max_new_tokens: int, request_id: str = "") -> None:
        """Raise RequestTooLargeError unless the KV of a request of these lengths could fit
        the KVP groups it may use, with nothing else there (what add_request checks first)."""
        total_tokens = prompt_len + max_new_tokens
        if self.table.layout.can_ever_fit(total_tokens):
            return
        config = self.config
        limit = config.max_tokens_per_kvp_group
        placement = (
            "a request must fit on one group"
            if limit is None
            else f"at most {limit} tokens of a request per group"
        )
        raise RequestTooLargeError(
            f"{f'request {request_id!r}' if request_id else 'the request'} needs KV for "
            f"{total_tokens} tokens (prompt + max_new_tokens); the cache holds "
            f"{config.num_blocks} blocks of {config.block_size} tokens on each of "
            f"{config.kvp_groups} KVP group(s), and {placement}"
        )

    # -- one iteration --------------------------------------------------------------------------

    def take_released(self) -> tuple[str, ...]:
        """Requests whose KV blocks were released since the last plan, which would have carried
        them to the stages (BatchPlan.released): for an engine going idle to pass on itself."""
        return self.table.take_released()

    def schedule(self, now: float) -> BatchPlan:
        """The next micro-batch to issue, or an empty plan when nothing can be issued now
        (stage 0 busy, the pipeline full, or no work ready)."""
        running = len(self._in_flight) - len(self._paused)
        if self._in_stage0 is not None or running >= self.config.pp_stages:
            return self._empty_plan(now, ())
        if getattr(self.cost, "prefill_version", 0) != self._prefill_version:
            self._reprice()
        batch = BatchBuilder(self.config, self.policy.chunking, self.cost)
        preempted = self._decodes.schedule(batch, now)
        # After an eviction memory is tight: admitting anyone now would only invite the next one.
        self._schedule_prefills(batch, now, admit=not preempted)
        if not batch.seqs:
            return self._empty_plan(now, preempted)
        batch_time, stage_time = batch.predicted_times()
        plan = BatchPlan(
            plan_id=self._next_plan_id,
            created_at=now,
            seqs=tuple(batch.seqs),
            preempted=preempted,
            released=self.table.take_released(),
            predicted_time=batch_time,
            predicted_stage_time=stage_time,
        )
        self._next_plan_id += 1
        self._paused.plan_issued()
        self._in_flight[plan.plan_id] = plan
        self._in_stage0 = plan.plan_id
        for seq in plan.seqs:
            request = self.table.running[seq.request_id]
            request.issued = seq.end
            request.in_flight += 1
        return plan

    def on_stage0_done(self, plan: BatchPlan) -> None:
        """Stage 0 finished `plan`: the next micro-batch may enter, and with SPP the next chunk
        of each of its prompts may be issued."""
        if plan.is_empty:
            return
        if self._in_stage0 != plan.plan_id:
            raise ValueError(f"plan {plan.plan_id} is not in pipeline stage 0")
        self._in_stage0 = None
        early = self._done_early.get(plan.plan_id, ())
        for seq in plan.seqs:
            if seq.request_id not in early:
                self.table.requests[seq.request_id].stage0 = seq.end

    def on_step_done(
        self, plan: BatchPlan, now: float, finished: Collection[str] = ()
    ) -> list[SchedRequest]:
        """The last stage finished `plan` at `now` (plans finish in the order they were issued);
        every sequence with `samples` produced a token. `finished`: ids among those that the
        caller ends with that token (EOS, stop string); requests also end at max_new_tokens.
        Returns the requests that finished."""
        if plan.is_empty:
            return []
        if plan.plan_id not in self._in_flight:
            raise ValueError(f"plan {plan.plan_id} is not in flight")
        if plan.plan_id in self._paused:
            raise ValueError(f"plan {plan.plan_id} is paused")
        # A paused plan is passed by the plans issued while it waits: they share no request
        # with what is left of it (its other requests are in flight, so none of them is
        # scheduled again; only its decodes, finished early, may be).
        oldest = next(p for p in self._in_flight if p not in self._paused)
        if plan.plan_id != oldest:
            # A pipeline finishes micro-batches in the order they entered it; anything else
            # would move a request's cursors backwards.
            raise ValueError(f"plan {plan.plan_id} finished before plan {oldest}")
        if self._in_stage0 == plan.plan_id:
            self.on_stage0_done(plan)
        del self._in_flight[plan.plan_id]
        self._paused.forget(plan.plan_id)
        early = self._done_early.pop(plan.plan_id, None)
        seqs = plan.seqs if early is None else [s for s in plan.seqs if s.request_id not in early]
        return self._complete(seqs, now, finished)

    def on_seqs_done(
        self,
        plan: BatchPlan,
        request_ids: Collection[str],
        now: float,
        finished: Collection[str] = (),
    ) -> list[SchedRequest]:
        """The sequences of `request_ids` in `plan`, in stage 0, finished before the rest of
        it (a plan that pauses finishes its decodes at once, so that their next tokens can be
        scheduled while it waits); as on_step_done for them. Returns the requests that
        finished; on_step_done completes the others."""
        if plan.plan_id not in self._in_flight or self._in_stage0 != plan.plan_id:
            raise ValueError(f"plan {plan.plan_id} is not in pipeline stage 0")
        early = self._done_early.setdefault(plan.plan_id, set())
        seqs = [s for s in plan.seqs if s.request_id in request_ids and s.request_id not in early]
        early.update(seq.request_id for seq in seqs)
        for seq in seqs:
            self.table.requests[seq.request_id].stage0 = seq.end
        return self._complete(seqs, now, finished)

    def _complete(
        self, seqs: Sequence[ScheduledSeq], now: float, finished: Collection[str]
    ) -> list[SchedRequest]:
        """Move the cursors of `seqs`' requests past them and record their sampled tokens."""
        done: list[SchedRequest] = []
        for seq in seqs:
            request = self.table.requests[seq.request_id]
            request.in_flight -= 1
            if request.status.is_done:
                self.table.retire_if_idle(request)
                continue
            request.computed = seq.end
            if request.registered_blocks < len(request.block_hashes):
                self.table.layout.register_computed(request, self.table.pool)
            stop = seq.request_id in finished
            if seq.samples and self.table.record_token(request, now, stop):
                done.append(request)
        return done

    # -- pausing a plan between layers ----------------------------------------------------------

    def should_pause(self, plan: BatchPlan, now: float) -> bool:
        """Whether `plan`, in flight, should stop at its next layer boundary (or, paused, stay
        paused for one more plan): see `pause_time`."""
        due = self.pause_time(plan, now)
        return due is not None and due <= now

    def pause_time(self, plan: BatchPlan, now: float) -> float | None:
        """When `plan`, in flight, should stop between layers so that a request that arrived
        after it was planned goes first (`now` if at once); None: not as things stand
        (medha.scheduler.pausing). One plan is paused at a time, for at most `pause_budget`
        plans over all its pauses; pipelines never pause."""
        plan_id = plan.plan_id
        if self.config.pp_stages > 1 or plan_id not in self._in_flight:
            return None
        if plan_id not in self._paused and (self._in_stage0 != plan_id or self._paused):
            return None
        if not self._paused.within_budget(plan_id):
            return None
        lookahead = self._rank_time(now) - now
        return newcomers_pause_time(
            plan,
            self.table,
            self.policy.priority,
            self.cost,
            now,
            lookahead,
            self.config.max_batch_size,
            lead_guard=self._lead_guard,
            prefix_wait_s=self.config.target_batch_time,
            lone=ran_alone(plan, self.config),
        )

    def suspend(self, plan: BatchPlan) -> None:
        """`plan` stopped between layers: stage 0 is free for other plans until `resume`."""
        if self.config.pp_stages > 1:
            raise ValueError("plans pause only with one pipeline stage")
        if self._in_stage0 != plan.plan_id:
            raise ValueError(f"plan {plan.plan_id} is not in pipeline stage 0")
        self._in_stage0 = None
        self._paused.pause(plan.plan_id)

    def resume(self, plan: BatchPlan, *, pause_again: bool = True) -> None:
        """`plan` carries on: it holds stage 0 again (every plan issued meanwhile is done).
        `pause_again=False`: it may not pause again, as when its pause found nothing to run
        (the newcomer could not start after all: admission waits for memory, say); pausing
        it again would find the same at every layer."""
        if plan.plan_id not in self._paused:
            raise ValueError(f"plan {plan.plan_id} is not paused")
        if self._in_stage0 is not None or len(self._in_flight) > len(self._paused):
            raise ValueError(f"plan {plan.plan_id} cannot resume while another plan runs")
        self._paused.resume(plan.plan_id, pause_again)
        self._in_stage0 = plan.plan_id

    def stats(self) -> SchedulerStats:
        return SchedulerStats.of(self.table, len(self._in_flight), self._in_stage0 is not None)

    def _reprice(self) -> None:
        """The cost model's prefill level moved (an online time scale; rare): recompute every
        request's remaining work and priority terms.

        A caller's deadline stays: it was promised. A default deadline, max(1.5 x predicted
        work, 0.5 s), follows the new prediction until the first token: it was derived from a
        prediction now known to be off. Left at the old level, a long prompt's deadline would
        stay in the old units while its remaining work is counted in the new ones: on a machine
        1.4x slower than calibrated (the mixed_cpu runs), a document on its own schedule looks
        late, and LARS holds every new chat behind it for an iteration or two."""
        self._prefill_version = getattr(self.cost, "prefill_version", 0)
        priority = self.policy.priority
        for request in self.table.requests.values():
            request.reprice(self.cost)
            if not request.deadline_given and request.first_token_time is None:
                request.deadline = default_deadline(request.total_prefill_s, self.config)
        for request in self.table.queued.values():
            priority.refresh(request, self.cost)  # ranked by cached terms alone (see keys())

    # -- building a batch ---------------------------------------------------------------------

    def _rank_time(self, now: float) -> float:
        """When priorities are compared: the next decision point (see rank_ahead). With a
        pipeline the next micro-batch is issued once this one leaves stage 0: after about the
        budget over the number of stages."""
        config = self.config
        if not config.rank_ahead:
            return now
        return now + config.target_batch_time / config.pp_stages

    def _prefill_ready(self, request: SchedRequest) -> bool:
        """Whether the next chunk of a started prompt may be issued now."""
        if request.tokens_left <= 0:
            return False
        if self.config.pipelined:
            return request.stage0 == request.issued  # SPP: the previous chunk left stage 0
        return request.in_flight == 0

    def _schedule_prefills(self, batch: BatchBuilder, now: float, admit: bool) -> None:
        """Prefill chunks in priority order while the batch has room (see BatchBuilder);
        queued requests are started only when `admit`."""
        policy, cost, table = self.policy.priority, self.cost, self.table
        rank_at = self._rank_time(now)
        started = policy.ranked(
            (r for r in table.prefilling.values() if self._prefill_ready(r)), rank_at, cost
        )
        admitting = admit and len(table.running) < self.config.max_batch_size
        # Queued requests do not move: their key terms were set when they were queued.
        queued = table.queued_by_arrival() if admitting else []
        keys = policy.keys(queued, rank_at)
        gate = SharedPrefixGate(
            table, cost, self.config.target_batch_time, policy.shares_prefixes_in_flight
        )
        gate.inherit(started, queued, keys)
        candidates = CandidateOrder(started, queued, keys)
        if self._lead_guard and started:
            promote_guarded(candidates, cost, rank_at)
        pending_work: list[tuple[float, int]] | None = None
        while candidates and not batch.is_full and not batch.all_groups_closed:
            request = candidates.pop()
            if not request.status.is_queued:
                groups = table.layout.active_groups(request, request.issued)
                if batch.accepts_prefill_on(groups):
                    self._add_prefill_chunk(batch, request, groups, now)
                continue
            if len(table.running) >= self.config.max_batch_size:
                candidates.drop_queued()
                continue
            feasible = table.layout.feasible_first_groups(request.known_tokens, table.pool, request)
            if not feasible:
                # Admit nobody behind a request that waits for memory, or it could starve.
                candidates.drop_queued()
                continue
            if gate.holds(request):
                continue  # a started prefill computes its next block: it takes it once computed
            open_groups = [group for group in feasible if group not in batch.closed_groups]
            if not open_groups:
                continue
            if len(open_groups) == 1:
                first = open_groups[0]
            else:
                if pending_work is None:
                    pending_work = table.pending_work(cost)
                first = table.layout.choose_first(
                    request, open_groups, table.pool, pending_work, cost
                )
            if self._add_prefill_chunk(batch, request, [first], now):
                gate.started(request)
                if pending_work:
                    table.add_pending(pending_work, request, cost)

    def _add_prefill_chunk(
        self, batch: BatchBuilder, request: SchedRequest, groups: Sequence[int], now: float
    ) -> bool:
        """Size and add the next chunk of `request` (starting it if queued). False if no room."""
        hit: list[int] = []
        if request.status.is_queued and request.block_hashes:
            hit, groups = self.table.layout.hit_placement(request, groups[0], self.table.pool)
            if not batch.accepts_prefill_on(groups):
                return False
        start = request.issued + len(hit) * self.config.block_size
        # Long-prefill rules are Medha's; the FCFS baselines do without them.
        is_long = (
            self.policy.chunking is ChunkingMode.ADAPTIVE
            and start >= self.config.long_prefill_threshold
        )
        budget_fraction = self.config.lone_budget_fraction if len(self.table.requests) == 1 else 1.0
        if is_long:
            if any(group in batch.long_groups for group in groups):
                return False
            # Space sharing: a long prefill ahead of schedule leaves part of the budget to others
            # (its slack judged where the ranking judges it).
            rho = relative_slack(request, self._rank_time(now), self.cost)
            budget_fraction *= 1.0 - min(max(rho, 0.0), 0.5)
        all_left = request.known_tokens - start
        tokens_left = all_left
        to_boundary = self.table.layout.tokens_to_boundary(start)
        if to_boundary is not None:
            tokens_left = min(tokens_left, to_boundary)
        finishes = tokens_left == all_left
        sized = batch.prefill_chunk(
            groups, start, tokens_left, budget_fraction, finishes, request.scored_positions
        )
        if sized is None:
            return False
        chunk, predicted = sized
        new_blocks: NewBlocks = ()
        if request.status.is_queued:
            new_blocks = self.table.start(request, groups[0], now, hit)
        end = start + chunk
        seq = ScheduledSeq(
            request_id=request.request_id,
            kind=SeqKind.PREFILL,
            start=start,
            end=end,
            shards=self.table.layout.shards(request, start),
            new_blocks=new_blocks,
            samples=end == request.known_tokens,
            head_rows=lm_head_rows(request.scored_positions, start, end),
        )
        batch.add_prefill(seq, groups, is_long, predicted)
        return True

    def _empty_plan(self, now: float, preempted: tuple[str, ...]) -> BatchPlan:
        return BatchPlan(
            plan_id=-1,
            created_at=now,
            seqs=(),
            preempted=preempted,
            released=self.table.take_released(),
        )
