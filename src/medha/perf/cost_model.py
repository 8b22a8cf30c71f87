"""The analytic roofline cost model: medha's BatchCostModel for a TP x PP x KVP replica.

Each op of a layer costs max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) on one device;
collectives cost wire bytes / achieved link bandwidth plus a fixed latency; a layer's time is
the sum over its ops, and every layer of a batch costs the same. Which roofline branch binds is
recorded per op, so any prediction is also a sum of terms linear in the profile's coefficients
(`terms()`), which is what calibration fits.

KVP: `seqs` is the view of ONE KVP group (every sequence it runs this step). A sequence spread
over g groups costs that group the reads of its own shard (`SeqShape.kv_tokens`: M tokens on
every group but the last) plus the exact merge of the groups' partial outputs; its linear layers
run on every group in parallel. The replica's step time is the slowest group's, so a scheduler
asks once per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medha.model.arch import ModelArch
from medha.perf.batch_sums import BatchSums, RooflinePricer
from medha.perf.hardware import DeviceProfile
from medha.perf.lm_head import LmHeadCost
from medha.perf.prefill_table import ChunkBudget, PrefillTable
from medha.perf.replica import ReplicaSpec
from medha.perf.roofline import (
    LSE_BYTES,
    AttentionShape,
    Terms,
    allgather_wire_bytes,
    elementwise_bytes,
    linear_work,
    ring_allreduce_wire_bytes,
)
from medha.scheduler.cost import SeqShape


class RooflineCostModel:
    """Predicts batch, stage and prefill times of `arch` on `replica` built from `profile`."""

    def __init__(
        self,
        arch: ModelArch,
        profile: DeviceProfile,
        replica: ReplicaSpec | None = None,
        *,
        dtype_bytes: int = 2,
        reference_chunk_tokens: int = 2048,
        prefill_chunking: ChunkBudget | None = None,
    ) -> None:
        """`prefill_chunking`: how the scheduler sizes a lone prompt's chunks, which sets the
        predicted prefill time LARS ranks by (see prefill_table.py); without it, prompts are
        walked in chunks of `reference_chunk_tokens`."""
        replica = replica or ReplicaSpec()
        replica.check_shards(arch)
        self.arch, self.profile, self.replica = arch, profile, replica
        self.dtype_bytes = dtype_bytes
        self._stage_layers = replica.layers_per_stage(arch.num_layers)

        tp = replica.tp
        self._q_heads = arch.num_heads // tp
        # TP wider than the KV heads replicates them: each device still holds one KV head.
        self._kv_heads = max(1, arch.num_kv_heads // tp)
        q_dim, kv_dim = self._q_heads * arch.head_dim, self._kv_heads * arch.head_dim
        inter = arch.intermediate_size // tp
        h = arch.hidden_size
        self._linears = ((h, q_dim + 2 * kv_dim), (q_dim, h), (h, 2 * inter), (inter, h))
        self._elementwise_per_token = elementwise_bytes(1, h, q_dim, kv_dim, inter, dtype_bytes)
        self._attention = AttentionShape(self._q_heads, self._kv_heads, arch.head_dim, dtype_bytes)
        eff = profile.efficiency
        self._attention_rates = (
            profile.peak_flops,
            profile.peak_flops * eff.attention,
            profile.hbm_bandwidth,
            profile.hbm_bandwidth * eff.kv_read,
        )

        gpn = profile.gpus_per_node
        self._tp_link = self._link(replica.tp_spans_one_node(gpn))
        self._kvp_link = self._link(replica.kvp_spans_one_node(gpn))
        self._pp_link = self._link(replica.pp_neighbours_share_node(gpn))
        self._head = LmHeadCost(h, arch.vocab_size, profile, tp, dtype_bytes, self._tp_link)
        self._token_cache: dict[int, tuple[float, float, float, float]] = {}
        self._head_cache: dict[int, float] = {}
        self._time_scale = 1.0
        self._context_scale = 1.0
        self._table_context_scale = 1.0
        """The `context_scale` the prefill table walks with."""
        self._prefill_args = (reference_chunk_tokens, prefill_chunking)
        self._prefill = self.new_prefill_table(1.0)
        self.defer_prefill_tables = False
        """False: a `context_scale` move re-walks the prefill table at once. True (the
        engine, see prefill_refresh.py): it only sets `prefill_table_due`."""
        self.prefill_table_due: float | None = None
        """The `context_scale` a new prefill table is due at (None: the table is current)."""
        self.prefill_scale = 1.0
        """The factor on prefill times: `time_scale`, followed in steps of more than 10%."""
        self.prefill_version = 0
        """Bumped whenever `prefill_scale` moves: the scheduler then re-prices its requests."""

    def _link(self, intra_node: bool) -> tuple[float, float]:
        p = self.profile
        if intra_node:
            return p.nvlink_bandwidth, p.nvlink_latency_s
        return p.network_bandwidth, p.network_latency_s

    # -- BatchCostModel ---------------------------------------------------------------------

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.batch_seconds(self.sums_of(seqs))

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.stage_seconds(self.sums_of(seqs))

    def prefill_time(self, prompt_tokens: int) -> float:
        return self._prefill.prefill_time(prompt_tokens) * self.prefill_scale

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        remaining = self._prefill.remaining_prefill_time(processed_tokens, prompt_tokens)
        return remaining * self.prefill_scale

    @property
    def time_scale(self) -> float:
        """Factor on every batch, stage and chunk time (1.0: as calibrated), e.g. learned online
        by OnlineTimeScale (time_scale.py). Prefill times follow it in steps (`prefill_scale`):
        LARS's slack stays true only if predicted work is on the same level as the batches
        that do it, but every change re-prices every request, so small moves wait."""
        return self._time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"time_scale must be > 0, got {value}")
        self._time_scale = value
        if abs(math.log(value / self.prefill_scale)) > _PREFILL_RESCALE_LOG:
            self.prefill_scale = value
            self.prefill_version += 1

    @property
    def context_scale(self) -> float:
        """Factor on the terms that grow with the KV context (attention FLOPs, KV reads and
        gathers), relative to the rest, on top of `time_scale` (1.0: as calibrated). Learned
        online by OnlineTimeScale where the calibrated shape is off: on a 2-core CPU, batches
        of small chunks over long prefixes ran ~1.3x slower against the linears than the
        calibration grid said. Prefill predictions are re-walked once it moves by more than 10%
        from the value they were walked with (a `prefill_version` step)."""
        return self._context_scale

    @context_scale.setter
    def context_scale(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"context_scale must be > 0, got {value}")
        self._context_scale = value
        due = abs(math.log(value / self._table_context_scale)) > _PREFILL_RESCALE_LOG
        self.prefill_table_due = value if due else None
        if due and not self.defer_prefill_tables:
            self.install_prefill_table(self.new_prefill_table(value), value)

    def new_prefill_table(self, context_scale: float) -> PrefillTable:
        """An empty prefill table walking at `context_scale` (fixed, or its predictions would
        depend on when each length was first asked for). It extends itself on demand, or a
        slice at a time (`PrefillTable.walk_toward`)."""
        chunk_tokens, budget = self._prefill_args

        def chunk_times(chunk: SeqShape) -> tuple[float, float]:
            return self._raw_chunk_times(chunk, context_scale)

        return PrefillTable(chunk_times, self.replica, chunk_tokens, budget=budget)

    def install_prefill_table(self, table: PrefillTable, context_scale: float) -> None:
        """Predict prefills with `table`, walked at `context_scale` (a `prefill_version` step:
        the scheduler re-prices its requests)."""
        self._prefill = table
        self._table_context_scale = context_scale
        self.prefill_version += 1
        moved = abs(math.log(self._context_scale / context_scale)) > _PREFILL_RESCALE_LOG
        self.prefill_table_due = self._context_scale if moved else None

    def context_share(self, seqs: Sequence[SeqShape]) -> float:
        """The fraction of `batch_time(seqs)` that `context_scale` multiplies."""
        sums = self.sums_of(seqs)
        total = self._raw_batch_seconds(sums)
        if total <= 0:
            return 0.0
        return self.arch.num_layers * self._context_seconds(sums) / total

    def batch_pricer(self) -> RooflinePricer:
        """An empty batch that prices "this batch plus one sequence" in O(1) (the optional
        medha.scheduler.pricing protocol the scheduler's adaptive chunking uses)."""
        return RooflinePricer(self)

    # -- decomposition ----------------------------------------------------------------------

    def chunk_times(self, chunk: SeqShape) -> tuple[float, float]:
        """(batch_time, stage_time) of a batch holding only `chunk`."""
        batch, stage = self._raw_chunk_times(chunk, self._context_scale)
        return batch * self.time_scale, stage * self.time_scale

    def _raw_chunk_times(self, chunk: SeqShape, context_scale: float) -> tuple[float, float]:
        """`chunk_times` without `time_scale`, at the given `context_scale` (the prefill table
        walks at the one it was created with, and applies `prefill_scale` itself)."""
        sums = self.seq_sums(chunk)
        return (
            self._raw_batch_seconds(sums, context_scale),
            max(self._stage_seconds(sums, context_scale)),
        )

    def batch_terms(self, seqs: Sequence[SeqShape]) -> Terms:
        """The batch's time through every stage, as additive terms (see roofline.Terms), as
        calibrated: without the online `time_scale` and `context_scale`."""
        # A batch crosses every stage, and each stage's worker pays the per-step overhead
        # (input preparation, host syncs): a plan alone in the pipeline takes the sum.
        sums = self.sums_of(seqs)
        return sum(self._stages_terms(sums), Terms()) if _has_work(sums) else Terms()

    def stage_terms(self, seqs: Sequence[SeqShape]) -> Terms:
        """The slowest pipeline stage's share of the batch, including its send downstream."""
        sums = self.sums_of(seqs)
        if not _has_work(sums):
            return Terms()
        eff = self.profile.efficiency
        return max(self._stages_terms(sums), key=lambda t: t.seconds(eff))

    def breakdown(self, seqs: Sequence[SeqShape]) -> dict[str, float]:
        """Seconds per term (matmul, attention, memory, kv_read, ...) as calibrated; they sum to
        `batch_time` while the online scales are 1."""
        return self.batch_terms(seqs).seconds_by_term(self.profile.efficiency)

    def sums_of(self, seqs: Sequence[SeqShape]) -> BatchSums:
        sums = BatchSums()
        for seq in seqs:
            self.accumulate(sums, seq)
        return sums

    def seq_sums(self, seq: SeqShape) -> BatchSums:
        """One sequence's share of a layer: its tokens, attention work and KVP merge bytes."""
        sums = BatchSums()
        self.accumulate(sums, seq)
        return sums

    def accumulate(self, sums: BatchSums, seq: SeqShape) -> None:
        """Add one sequence's share of a layer to `sums`.

        Called for every sequence of every batch priced (hundreds of decodes per iteration), so
        it allocates nothing and its constants are looked up once, in `__init__`."""
        q_tokens, kv_tokens, groups = seq.q_tokens, seq.kv_tokens, seq.kvp_groups
        if q_tokens < 0 or kv_tokens < 0 or seq.head_rows < 0:
            raise ValueError(f"token and row counts must be >= 0: {seq}")
        if not 1 <= groups <= self.replica.kvp:
            raise ValueError(f"kvp_groups must be in [1, {self.replica.kvp}]: {seq}")
        if q_tokens == 0:  # only the LM-head rows of a sequence another group ran (head_only)
            if kv_tokens or groups != 1:
                raise ValueError(f"a head-only shape has no KV tokens and one group: {seq}")
            sums.head_rows += seq.head_rows
            return
        local_kv = float(kv_tokens)  # this group's shard (SeqShape.kv_tokens)
        flops, nbytes = self._attention.work(q_tokens, local_kv)
        peak, attention_rate, hbm, kv_read_rate = self._attention_rates
        sums.tokens += q_tokens
        sums.seqs += 1
        sums.head_rows += seq.head_rows
        sums.kv_tokens += local_kv
        # The roofline branch is chosen per sequence: a decode reads KV, a long chunk computes.
        if flops / attention_rate >= nbytes / kv_read_rate:
            sums.attention += flops / peak
        else:
            sums.kv_read += nbytes / hbm
        if groups > 1:
            partial = q_tokens * self._q_heads * (self.arch.head_dim * self.dtype_bytes + LSE_BYTES)
            sums.merge_bytes += allgather_wire_bytes(partial, groups)

    def accumulate_decodes(
        self, sums: BatchSums, kv_tokens: Sequence[int], heads: bool = True
    ) -> None:
        """`accumulate` of SeqShape(1, kv, 1, 1 if heads else 0) for each kv in `kv_tokens`:
        the one-token steps of requests whose KV lives on one group (every decode without a KVP
        split), in one loop with the same arithmetic in the same order (so the same sums, bit
        for bit)."""
        attention_work = self._attention
        flops_per_key = attention_work.flops_per_key
        kv_bytes, qo_bytes = attention_work.kv_bytes_per_token, attention_work.qo_bytes_per_query
        peak, attention_rate, hbm, kv_read_rate = self._attention_rates
        attention, kv_read, local = sums.attention, sums.kv_read, sums.kv_tokens
        for kv in kv_tokens:
            if kv < 0:
                raise ValueError(f"token counts must be >= 0: kv_tokens={kv}")
            kv_f = float(kv)
            local += kv_f
            flops = flops_per_key * (kv_f + 1.0)
            nbytes = (kv_f + 1) * kv_bytes + qo_bytes
            if flops / attention_rate >= nbytes / kv_read_rate:
                attention += flops / peak
            else:
                kv_read += nbytes / hbm
        count = len(kv_tokens)
        sums.tokens += count
        sums.seqs += count
        if heads:
            sums.head_rows += count
        sums.attention, sums.kv_read, sums.kv_tokens = attention, kv_read, local

    def batch_seconds(self, sums: BatchSums) -> float:
        """`batch_time` of a batch given as its sums (what the pricer calls)."""
        return self._raw_batch_seconds(sums) * self.time_scale

    def stage_seconds(self, sums: BatchSums) -> float:
        """`stage_time` of a batch given as its sums: its slowest pipeline stage."""
        if len(self._stage_layers) == 1 or not _has_work(sums):
            return self.batch_seconds(sums)
        return max(self._stage_seconds(sums)) * self.time_scale

    def _raw_batch_seconds(self, sums: BatchSums, context_scale: float | None = None) -> float:
        if not _has_work(sums):
            return 0.0
        layer, first, last, send, iteration = self._seconds_parts(sums, context_scale)
        stages = len(self._stage_layers)
        return (
            self.arch.num_layers * layer + first + last + (stages - 1) * send + stages * iteration
        )

    def _stage_seconds(self, sums: BatchSums, context_scale: float | None = None) -> list[float]:
        layer, first, last, send, iteration = self._seconds_parts(sums, context_scale)
        final = len(self._stage_layers) - 1
        return [
            layers * layer
            + iteration
            + (first if stage == 0 else 0.0)
            + (last if stage == final else send)
            for stage, layers in enumerate(self._stage_layers)
        ]

    def _seconds_parts(
        self, sums: BatchSums, context_scale: float | None = None
    ) -> tuple[float, float, float, float, float]:
        """Seconds of (one layer, stage 0's embedding, the last stage's head, one send between
        stages, the per-iteration overhead): the same sums as `_stages_terms` gives as Terms,
        without building Terms, since this is the hot path of adaptive chunking (a test checks
        that both agree)."""
        eff = self.profile.efficiency
        if not sums.seqs:
            # Only LM-head rows of sequences other groups ran (head_only): no layer runs here,
            # and the rows arrive at the last stage.
            return 0.0, 0.0, self._lm_head_seconds(sums.head_rows), 0.0, eff.iteration_overhead_s
        token_layer, embedding, norm, send = self._token_seconds(sums.tokens)
        layer = (
            token_layer
            + self._context_seconds(sums, context_scale)
            + eff.layer_overhead_s
            + sums.seqs * eff.sequence_overhead_s
        )
        if sums.merge_bytes:
            bandwidth, latency = self._kvp_link
            layer += sums.merge_bytes / bandwidth / eff.collective + latency
        head = norm + self._lm_head_seconds(sums.head_rows)
        return layer, embedding, head, send, eff.iteration_overhead_s

    def _context_seconds(self, sums: BatchSums, context_scale: float | None = None) -> float:
        """One layer's seconds that grow with the KV context: attention, KV reads, gathers;
        at `context_scale` (default: the live one)."""
        eff = self.profile.efficiency
        seconds = (
            sums.attention / eff.attention
            + sums.kv_read / eff.kv_read
            + sums.kv_tokens * eff.kv_gather_s
        )
        return seconds * (self._context_scale if context_scale is None else context_scale)

    def _token_seconds(self, tokens: int) -> tuple[float, float, float, float]:
        """Seconds of what depends only on the batch's query tokens: (one layer's linears,
        elementwise ops and TP all-reduces, the embedding, the final norm, one stage send).
        Memoised: batches of the same size recur all the time."""
        cached = self._token_cache.get(tokens)
        if cached is None:
            eff = self.profile.efficiency
            matmul, memory = self._linear_ideal(tokens)
            collective, latency = self._tp_ideal(tokens)
            send_collective, send_latency = self._send_ideal(tokens)
            cached = (
                matmul / eff.matmul + memory / eff.memory + collective / eff.collective + latency,
                self._embedding_ideal(tokens) / eff.memory,
                self._norm_ideal(tokens) / eff.memory,
                send_collective / eff.collective + send_latency,
            )
            if len(self._token_cache) >= _CACHE_LIMIT:
                self._token_cache.clear()
            self._token_cache[tokens] = cached
        return cached

    def _lm_head_seconds(self, rows: int) -> float:
        cached = self._head_cache.get(rows)
        if cached is None:
            cached = self._head.terms(rows).seconds(self.profile.efficiency)
            if len(self._head_cache) >= _CACHE_LIMIT:
                self._head_cache.clear()
            self._head_cache[rows] = cached
        return cached

    def _stages_terms(self, sums: BatchSums) -> list[Terms]:
        layer = send = Terms()
        if sums.seqs:  # else only LM-head rows of sequences other groups ran (head_only)
            layer = self._layer_terms(sums)
            send_collective, send_latency = self._send_ideal(sums.tokens)
            send = Terms(collective=send_collective, latency=send_latency)
        last = len(self._stage_layers) - 1
        stages = []
        for stage, layers in enumerate(self._stage_layers):
            terms = layer.scaled(layers) + Terms(iterations=1.0)
            if stage == 0:
                terms += Terms(memory=self._embedding_ideal(sums.tokens))
            if stage == last:
                terms += self._head.terms(sums.head_rows)
                terms += Terms(memory=self._norm_ideal(sums.tokens))
            else:
                terms += send
            stages.append(terms)
        return stages

    def _layer_terms(self, sums: BatchSums) -> Terms:
        """One decoder layer on one device, for the whole batch."""
        matmul, memory = self._linear_ideal(sums.tokens)
        collective, latency = self._tp_ideal(sums.tokens)
        if sums.merge_bytes:
            bandwidth, lat = self._kvp_link
            collective += sums.merge_bytes / bandwidth
            latency += lat
        return Terms(
            matmul=matmul,
            attention=sums.attention,
            memory=memory,
            kv_read=sums.kv_read,
            collective=collective,
            latency=latency,
            layers=1.0,
            sequence_layers=float(sums.seqs),
            gathered_kv=sums.kv_tokens,
        )

    # Ideal seconds (work / peak rate) per term; each op is charged to its binding branch.

    def _linear_ideal(self, tokens: int) -> tuple[float, float]:
        """(matmul, memory) of one layer's projections, MLP and elementwise ops."""
        p, eff, d = self.profile, self.profile.efficiency, self.dtype_bytes
        peak, hbm = p.peak_flops, p.hbm_bandwidth
        matmul = memory = 0.0
        for in_f, out_f in self._linears:
            work = linear_work(tokens, in_f, out_f, d)
            if work.flops / (peak * eff.matmul) >= work.bytes / (hbm * eff.memory):
                matmul += work.flops / peak
            else:
                memory += work.bytes / hbm
        memory += tokens * self._elementwise_per_token / hbm
        return matmul, memory

    def _tp_ideal(self, tokens: int) -> tuple[float, float]:
        """(collective, latency) of one layer's TP all-reduces."""
        if self.replica.tp == 1:
            return 0.0, 0.0
        # Two all-reduces per layer: after the attention output projection and after the MLP.
        bandwidth, lat = self._tp_link
        message = tokens * self.arch.hidden_size * self.dtype_bytes
        return 2 * ring_allreduce_wire_bytes(message, self.replica.tp) / bandwidth, 2 * lat

    def _embedding_ideal(self, tokens: int) -> float:
        """Memory: gather one embedding row per token and write it out."""
        return 2 * tokens * self.arch.hidden_size * self.dtype_bytes / self._hbm

    def _norm_ideal(self, tokens: int) -> float:
        """Memory: the final norm over every token of the batch (last stage)."""
        return 2 * tokens * self.arch.hidden_size * self.dtype_bytes / self._hbm

    def _send_ideal(self, tokens: int) -> tuple[float, float]:
        """(collective, latency): hidden states to the next stage; every TP rank sends its copy
        over its own link."""
        bandwidth, latency = self._pp_link
        return tokens * self.arch.hidden_size * self.dtype_bytes / bandwidth, latency

    @property
    def _hbm(self) -> float:
        return self.profile.hbm_bandwidth


_PREFILL_RESCALE_LOG = math.log(1.1)
"""`prefill_scale` follows `time_scale` once they differ by more than 10%."""

_CACHE_LIMIT = 1 << 16
"""Entries per memo table before it is cleared (bounds memory on very long runs)."""


def _has_work(sums: BatchSums) -> bool:
    """Whether a batch runs anything: a sequence, or LM-head rows of others (head_only)."""
    return bool(sums.seqs or sums.head_rows)
