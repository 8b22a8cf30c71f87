"""The analytic roofline cost model: medha's BatchCostModel for a TP x PP x KVP replica.

Each op of a layer costs max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) on one device;
collectives cost wire bytes / achieved link bandwidth plus a fixed latency; a layer's time is
the sum over its ops, and every layer of a batch costs the same. Which roofline branch binds is
recorded per op, so any prediction is also a sum of terms linear in the profile's coefficients
(`terms()`), which is what calibration fits.

KVP: `seqs` is the view of ONE KVP group (every sequence it runs this step). A sequence spread
over g groups costs that group a 1/g share of the KV reads plus the exact merge of the groups'
partial outputs; its linear layers run on every group in parallel. The replica's step time is the
slowest group's, so a scheduler spreading short requests over groups asks once per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medha.model.arch import ModelArch
from medha.perf.hardware import DeviceProfile
from medha.perf.prefill_table import PrefillTable
from medha.perf.replica import ReplicaSpec
from medha.perf.roofline import (
    LSE_BYTES,
    Terms,
    allgather_wire_bytes,
    attention_work,
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
    ) -> None:
        replica = replica or ReplicaSpec()
        _check_shardable(arch, replica)
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
        self._vocab_shard = math.ceil(arch.vocab_size / tp)

        gpn = profile.gpus_per_node
        self._tp_link = self._link(replica.tp_spans_one_node(gpn))
        self._kvp_link = self._link(replica.kvp_spans_one_node(gpn))
        self._pp_link = self._link(replica.pp_neighbours_share_node(gpn))
        self._prefill = PrefillTable(self.chunk_times, replica, reference_chunk_tokens)

    def _link(self, intra_node: bool) -> tuple[float, float]:
        p = self.profile
        if intra_node:
            return p.nvlink_bandwidth, p.nvlink_latency_s
        return p.network_bandwidth, p.network_latency_s

    # -- BatchCostModel ---------------------------------------------------------------------

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.batch_terms(seqs).seconds(self.profile.efficiency)

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.stage_terms(seqs).seconds(self.profile.efficiency)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self._prefill.prefill_time(prompt_tokens)

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        return self._prefill.remaining_prefill_time(processed_tokens, prompt_tokens)

    # -- decomposition ----------------------------------------------------------------------

    def chunk_times(self, chunk: SeqShape) -> tuple[float, float]:
        """(batch_time, stage_time) of a batch holding only `chunk` (feeds the prefill table)."""
        eff = self.profile.efficiency
        stages = self._stages_terms([chunk])
        return _batch_of(stages).seconds(eff), max(t.seconds(eff) for t in stages)

    def batch_terms(self, seqs: Sequence[SeqShape]) -> Terms:
        """The batch's time through every stage, as additive terms (see roofline.Terms)."""
        return _batch_of(self._stages_terms(seqs)) if seqs else Terms()

    def stage_terms(self, seqs: Sequence[SeqShape]) -> Terms:
        """The slowest pipeline stage's share of the batch, including its send downstream."""
        if not seqs:
            return Terms()
        eff = self.profile.efficiency
        return max(self._stages_terms(seqs), key=lambda t: t.seconds(eff))

    def breakdown(self, seqs: Sequence[SeqShape]) -> dict[str, float]:
        """Seconds of `batch_time` per term (matmul, attention, memory, kv_read, ...)."""
        return self.batch_terms(seqs).seconds_by_term(self.profile.efficiency)

    def _stages_terms(self, seqs: Sequence[SeqShape]) -> list[Terms]:
        for seq in seqs:
            self._check_seq(seq)
        tokens = sum(s.q_tokens for s in seqs)
        layer = self._layer_terms(seqs, tokens)
        send = self._send_terms(tokens)
        last = len(self._stage_layers) - 1
        stages = []
        for stage, layers in enumerate(self._stage_layers):
            terms = layer.scaled(layers) + Terms(iterations=1.0)
            if stage == 0:
                terms += self._embedding_terms(tokens)
            if stage == last:
                terms += self._head_terms(seqs, tokens)
            else:
                terms += send
            stages.append(terms)
        return stages

    def _check_seq(self, seq: SeqShape) -> None:
        if seq.q_tokens < 0 or seq.kv_tokens < 0:
            raise ValueError(f"token counts must be >= 0: {seq}")
        if not 1 <= seq.kvp_groups <= self.replica.kvp:
            raise ValueError(f"kvp_groups must be in [1, {self.replica.kvp}]: {seq}")

    def _layer_terms(self, seqs: Sequence[SeqShape], tokens: int) -> Terms:
        """One decoder layer on one device, for the whole batch."""
        p, eff, d = self.profile, self.profile.efficiency, self.dtype_bytes
        peak, hbm = p.peak_flops, p.hbm_bandwidth
        matmul = memory = attention = kv_read = collective = latency = 0.0

        for in_f, out_f in self._linears:
            work = linear_work(tokens, in_f, out_f, d)
            if work.flops / (peak * eff.matmul) >= work.bytes / (hbm * eff.memory):
                matmul += work.flops / peak
            else:
                memory += work.bytes / hbm
        memory += tokens * self._elementwise_per_token / hbm

        head_dim = self.arch.head_dim
        merge_bytes = 0.0
        for seq in seqs:
            groups = seq.kvp_groups
            work = attention_work(
                seq.q_tokens, seq.kv_tokens / groups, self._q_heads, self._kv_heads, head_dim, d
            )
            if work.flops / (peak * eff.attention) >= work.bytes / (hbm * eff.kv_read):
                attention += work.flops / peak
            else:
                kv_read += work.bytes / hbm
            if groups > 1:
                partial = seq.q_tokens * self._q_heads * (head_dim * d + LSE_BYTES)
                merge_bytes += allgather_wire_bytes(partial, groups)
        if merge_bytes:
            bandwidth, lat = self._kvp_link
            collective += merge_bytes / bandwidth
            latency += lat

        if self.replica.tp > 1:
            # Two all-reduces per layer: after the attention output projection and after the MLP.
            bandwidth, lat = self._tp_link
            wire = ring_allreduce_wire_bytes(tokens * self.arch.hidden_size * d, self.replica.tp)
            collective += 2 * wire / bandwidth
            latency += 2 * lat

        return Terms(
            matmul=matmul,
            attention=attention,
            memory=memory,
            kv_read=kv_read,
            collective=collective,
            latency=latency,
            layers=1.0,
            sequence_layers=float(len(seqs)),
        )

    def _embedding_terms(self, tokens: int) -> Terms:
        # Gather one embedding row per token and write it out.
        return Terms(memory=2 * tokens * self.arch.hidden_size * self.dtype_bytes / self._hbm)

    def _head_terms(self, seqs: Sequence[SeqShape], tokens: int) -> Terms:
        """Final norm over the batch, then the (vocab-parallel) lm head on one row per sequence.

        SeqShape does not say whether a prefill chunk is its prompt's last, so every sequence is
        charged one row: the weight read, which dominates, happens once per iteration anyway.
        """
        p, eff = self.profile, self.profile.efficiency
        norm = 2 * tokens * self.arch.hidden_size * self.dtype_bytes / self._hbm
        work = linear_work(len(seqs), self.arch.hidden_size, self._vocab_shard, self.dtype_bytes)
        if work.flops / (p.peak_flops * eff.matmul) >= work.bytes / (self._hbm * eff.memory):
            return Terms(matmul=work.flops / p.peak_flops, memory=norm)
        return Terms(memory=norm + work.bytes / self._hbm)

    def _send_terms(self, tokens: int) -> Terms:
        """Hidden states to the next stage; every TP rank sends its copy over its own link."""
        bandwidth, latency = self._pp_link
        message = tokens * self.arch.hidden_size * self.dtype_bytes
        return Terms(collective=message / bandwidth, latency=latency)

    @property
    def _hbm(self) -> float:
        return self.profile.hbm_bandwidth


def _batch_of(stages: list[Terms]) -> Terms:
    # Each stage's terms carry the per-iteration overhead once; a batch pays it once.
    return sum(stages, Terms()) + Terms(iterations=1.0 - len(stages))


def _check_shardable(arch: ModelArch, replica: ReplicaSpec) -> None:
    tp = replica.tp
    problems = []
    if arch.num_heads % tp:
        problems.append(f"num_heads={arch.num_heads}")
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        problems.append(f"num_kv_heads={arch.num_kv_heads}")
    if arch.intermediate_size % tp:
        problems.append(f"intermediate_size={arch.intermediate_size}")
    if problems:
        raise ValueError(f"tp={tp} does not divide {', '.join(problems)}")
    if arch.num_layers < replica.pp:
        raise ValueError(f"pp={replica.pp} exceeds the model's {arch.num_layers} layers")
