"""BatchBuilder: one iteration's batch under construction, and how big a prefill chunk may be.

Each KVP group runs the sequences that have KV on it, so the time budget is checked per group:
a sequence spread over n groups appears in each of their batches as SeqShape(q, shard, n), with
the shard that group holds (M tokens on every group but the last). Every sequence's LM-head
rows run on the sampling group (plan.SAMPLING_GROUP), where they are priced, also for sequences
that run elsewhere (`cost.head_only`). The iteration takes as long as its slowest group.
"""

from __future__ import annotations

from collections.abc import Sequence

from medha.scheduler.chunking import finish_ceiling, largest_fitting_chunk
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import BatchCostModel, SeqShape, head_only
from medha.scheduler.kvp import shard_sizes
from medha.scheduler.plan import SAMPLING_GROUP, ScheduledSeq, lm_head_rows
from medha.scheduler.policies import ChunkingMode
from medha.scheduler.pricing import new_pricer


class BatchBuilder:
    """Accumulates scheduled sequences and answers "how many prefill tokens still fit"."""

    def __init__(self, config: SchedulerConfig, chunking: ChunkingMode, cost: BatchCostModel):
        self.config = config
        self.chunking = chunking
        self.cost = cost
        self.seqs: list[ScheduledSeq] = []
        self.pricers = [new_pricer(cost) for _ in range(config.kvp_groups)]
        """Each group's batch as its cost model prices it (see pricing.py)."""
        self.tokens = [0] * config.kvp_groups
        """Query tokens per group (every sequence has at least one, so 0 means empty)."""
        self.reported_rows = 0
        """LM-head rows the sampling group runs for sequences it does not run itself."""
        self._times: list[float | None] = [0.0] * config.kvp_groups
        """Predicted time of each group's batch so far; None when it must be recomputed."""
        self.closed_groups: set[int] = set()
        """Groups that take no more prefills this iteration (budget spent)."""
        self.long_groups: set[int] = set()
        """Groups already running a long prefill this iteration."""
        self.num_prefills = 0

    @property
    def is_full(self) -> bool:
        return len(self.seqs) >= self.config.max_batch_size

    @property
    def all_groups_closed(self) -> bool:
        return len(self.closed_groups) == self.config.kvp_groups

    def accepts_prefill_on(self, groups: Sequence[int]) -> bool:
        return not any(group in self.closed_groups for group in groups)

    def add(self, seq: ScheduledSeq, groups: Sequence[int]) -> None:
        if len(groups) == 1:
            self.add_on_group(seq, groups[0])
            return
        q_tokens, head_rows = seq.end - seq.start, seq.head_rows
        pricers, tokens, times = self.pricers, self.tokens, self._times
        for group, shard in zip(groups, self._shards(seq.start, len(groups)), strict=True):
            rows = head_rows if group == SAMPLING_GROUP else 0
            pricers[group].add(SeqShape(q_tokens, shard, len(groups), rows))
            tokens[group] += q_tokens
            times[group] = None
        if SAMPLING_GROUP not in groups:
            self._add_reported_rows(head_rows)
        self.seqs.append(seq)

    def add_on_group(self, seq: ScheduledSeq, group: int) -> None:
        """`add` for a sequence whose KV lives on one group."""
        q_tokens = seq.end - seq.start
        if group == SAMPLING_GROUP:
            self.pricers[group].add(SeqShape(q_tokens, seq.start, 1, seq.head_rows))
        else:
            self.pricers[group].add(SeqShape(q_tokens, seq.start, 1, 0))
            self._add_reported_rows(seq.head_rows)
        self.tokens[group] += q_tokens
        self._times[group] = None
        self.seqs.append(seq)

    def price_decodes(self, group: int, kv_tokens: list[int]) -> None:
        """Price one-token steps on `group` (SeqShape(1, kv, 1) each, their LM-head rows on
        the sampling group) whose ScheduledSeqs the caller appended to `seqs` itself: the
        decode loop's bulk path (see `add_on_group`)."""
        if kv_tokens:
            sampler = group == SAMPLING_GROUP
            self.pricers[group].add_decodes(kv_tokens, heads=sampler)
            if not sampler:
                self._add_reported_rows(len(kv_tokens))
            self.tokens[group] += len(kv_tokens)
            self._times[group] = None

    def _add_reported_rows(self, rows: int) -> None:
        """LM-head rows of a sequence that runs on other groups: the sampling group's work."""
        self.pricers[SAMPLING_GROUP].add(head_only(rows))
        self.reported_rows += rows
        self._times[SAMPLING_GROUP] = None

    def add_prefill(
        self, seq: ScheduledSeq, groups: Sequence[int], is_long: bool, predicted: float | None
    ) -> None:
        """Add a prefill chunk; `predicted` is the batch time measured with it (if known)."""
        self.add(seq, groups)
        self.num_prefills += 1
        if is_long:
            self.long_groups.update(groups)
        # A prediction sized by the sampling group too may be that group's time, not this one's.
        sized_alone = not _sized_by_sampler(groups, seq.head_rows)
        if predicted is not None and len(groups) == 1 and sized_alone:
            self._times[groups[0]] = predicted

    def group_time(self, group: int) -> float:
        time = self._times[group]
        if time is None:
            time = self.pricers[group].time()
            self._times[group] = time
        return time

    def predict(
        self, groups: Sequence[int], q_tokens: int, kv_tokens: int, scored: range = range(0)
    ) -> float:
        """Batch time of the slowest of `groups` with a (q_tokens, kv_tokens) step added, whose
        rows at positions in `scored` run the LM head (see ScheduledSeq.head_rows) on the
        sampling group; that group counts too when the step does not run there and scores
        several rows (`_sized_by_sampler`)."""
        rows = lm_head_rows(scored, kv_tokens, kv_tokens + q_tokens)
        pricers = self.pricers
        if len(groups) == 1:
            group = groups[0]
            if group == SAMPLING_GROUP:
                return pricers[group].time_with(SeqShape(q_tokens, kv_tokens, 1, rows))
            time = pricers[group].time_with(SeqShape(q_tokens, kv_tokens, 1, 0))
        else:
            time = max(
                pricers[group].time_with(
                    SeqShape(q_tokens, shard, len(groups), rows if group == SAMPLING_GROUP else 0)
                )
                for group, shard in zip(groups, self._shards(kv_tokens, len(groups)), strict=True)
            )
        if _sized_by_sampler(groups, rows):
            time = max(time, pricers[SAMPLING_GROUP].time_with(head_only(rows)))
        return time

    def _shards(self, kv_tokens: int, groups: int) -> tuple[int, ...]:
        return shard_sizes(kv_tokens, groups, self.config.max_tokens_per_kvp_group)

    def prefill_chunk(
        self,
        groups: Sequence[int],
        kv_tokens: int,
        tokens_left: int,
        budget_fraction: float = 1.0,
        finishes: bool = False,
        scored: range = range(0),
    ) -> tuple[int, float | None] | None:
        """(tokens, predicted batch time if known) for the next prefill on `groups`, at most
        `tokens_left` tokens (`finishes`: they complete the prompt; `scored`: the prompt
        positions whose rows it scores, see ScheduledSeq.head_rows); None when those groups'
        budget is spent, which closes them."""
        first = self.num_prefills == 0
        chunk: int | None
        predicted: float | None = None
        if self.chunking is ChunkingMode.WHOLE:
            chunk = tokens_left
            if not first:
                predicted = self.predict(groups, tokens_left, kv_tokens, scored)
                if predicted > self._ceiling(1.0):
                    chunk = None
        elif self.chunking is ChunkingMode.FIXED:
            room = min(self.config.fixed_chunk - self.tokens[group] for group in groups)
            chunk = min(room, tokens_left) if room > 0 else None
        else:
            chunk, predicted = self._adaptive_chunk(
                groups, kv_tokens, tokens_left, budget_fraction, finishes, scored
            )
        if chunk is None and first:
            # Progress guarantee: decodes alone may exceed the budget, yet prefills must move.
            return min(self.config.min_chunk, tokens_left), None
        if chunk is None:
            # A chunk sized against the sampling group's budget too (a scored one's head
            # rows) may be refused for that budget alone: its own groups stay open to the
            # prefills after it (the next one there that does not fit closes them).
            rows = lm_head_rows(scored, kv_tokens, kv_tokens + tokens_left)
            if not _sized_by_sampler(groups, rows):
                self.closed_groups.update(groups)
            return None
        return chunk, predicted

    def _adaptive_chunk(
        self,
        groups: Sequence[int],
        kv_tokens: int,
        tokens_left: int,
        budget_fraction: float,
        finishes: bool,
        scored: range,
    ) -> tuple[int | None, float | None]:
        budget = self.config.target_batch_time * budget_fraction
        if self.num_prefills and max(self.group_time(group) for group in groups) >= budget * (
            1.0 - self.config.chunk_tolerance
        ):
            # The batch is already within the accepted band. A whole (short) prompt may still
            # ride along when the budget allows (nearly free if the batch is attention-bound),
            # but no partial top-up chunk: it would start, and reserve memory for, a prompt
            # that barely moves. Nor a rest over max_chunk, which the prompts ranked ahead are
            # held to (where time hardly grows with tokens it would fit, and overtake them).
            if tokens_left > self.config.max_chunk:
                return None, None
            predicted = self.predict(groups, tokens_left, kv_tokens, scored)
            ceiling = (
                finish_ceiling(budget, self.config)
                if finishes
                else budget * (1.0 + self.config.chunk_tolerance)
            )
            if predicted <= ceiling:
                return tokens_left, predicted
            return None, None
        choice = largest_fitting_chunk(
            lambda c: self.predict(groups, c, kv_tokens, scored),
            tokens_left,
            budget,
            self.config,
            finishes,
        )
        if choice is None:
            return None, None
        return choice.tokens, choice.predicted_time

    def _ceiling(self, fraction: float) -> float:
        return self.config.target_batch_time * fraction * (1.0 + self.config.chunk_tolerance)

    def predicted_times(self) -> tuple[float, float]:
        """(batch time, stage time) of the finished batch: its slowest group."""
        batch_time = stage_time = 0.0
        for group, tokens in enumerate(self.tokens):
            if not tokens and not (group == SAMPLING_GROUP and self.reported_rows):
                continue
            group_time = self.group_time(group)
            batch_time = max(batch_time, group_time)
            if self.config.pp_stages > 1:
                stage_time = max(stage_time, self.pricers[group].stage_time())
            else:
                stage_time = max(stage_time, group_time)
        return batch_time, stage_time


def _sized_by_sampler(groups: Sequence[int], head_rows: int) -> bool:
    """Whether a chunk on `groups` is sized against the sampling group's budget as well: when it
    does not run there and its LM-head rows grow with it (a scored prompt). One row per
    sequence is charged there without sizing anything: it is the same whatever the chunk, and a
    full sampling group must not close the others to prefills."""
    return head_rows > 1 and SAMPLING_GROUP not in groups
