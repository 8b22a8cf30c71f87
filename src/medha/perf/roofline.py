"""Per-op work (FLOPs and bytes) and the additive time decomposition the cost model sums.

Everything here is per device (one TP shard) and per layer unless a name says otherwise; the
caller passes already-sharded dimensions. Formulas are in docs/cost-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from medha.perf.hardware import Efficiency

LSE_BYTES = 4
"""Attention log-sum-exp partials travel as fp32 whatever the activation dtype."""


class Work(NamedTuple):
    """FLOPs and bytes of one op. A NamedTuple: the cost model builds one per sequence per
    question, hundreds of thousands per simulated minute, and tuples are cheap to create."""

    flops: float
    bytes: float


def linear_work(tokens: float, in_features: int, out_features: int, dtype_bytes: int) -> Work:
    """A GEMM `tokens x in -> tokens x out`: weights are read once, activations in and out."""
    return Work(
        flops=2.0 * tokens * in_features * out_features,
        bytes=(in_features * out_features + tokens * (in_features + out_features)) * dtype_bytes,
    )


def attention_work(
    q_tokens: float,
    kv_tokens: float,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
) -> Work:
    """Attention of a chunk of `q_tokens` over `kv_tokens` cached tokens plus itself (causal).

    FLOPs: QK^T and PV are 2 FLOPs per (query, key, q-head, dim) each; query j of the chunk
    sees kv + j + 1 keys, which sums to q * (kv + (q + 1) / 2). Bytes: K and V of the prefix and
    of the chunk are read once (GQA: shared by q_heads / kv_heads query heads, which is why the
    arithmetic intensity is ~ q * q_heads / kv_heads), Q is read and O written.
    """
    shape = AttentionShape(q_heads, kv_heads, head_dim, dtype_bytes)
    return Work(*shape.work(q_tokens, kv_tokens))


class AttentionShape:
    """attention_work for fixed head counts, with the constant factors multiplied out: the cost
    model asks this for every sequence of every batch it prices."""

    __slots__ = ("flops_per_key", "kv_bytes_per_token", "qo_bytes_per_query")

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> None:
        self.flops_per_key = 4.0 * q_heads * head_dim
        """FLOPs per (query, key) pair over all query heads: QK^T and PV."""
        self.kv_bytes_per_token = 2 * kv_heads * head_dim * dtype_bytes
        self.qo_bytes_per_query = 2 * q_heads * head_dim * dtype_bytes

    def work(self, q_tokens: float, kv_tokens: float) -> tuple[float, float]:
        """(FLOPs, bytes) of attention_work."""
        keys_seen = q_tokens * (kv_tokens + (q_tokens + 1) / 2.0)
        return (
            self.flops_per_key * keys_seen,
            (kv_tokens + q_tokens) * self.kv_bytes_per_token + q_tokens * self.qo_bytes_per_query,
        )


def elementwise_bytes(
    tokens: float,
    hidden: int,
    q_dim: int,
    kv_dim: int,
    intermediate: int,
    dtype_bytes: int,
) -> float:
    """Memory traffic of one layer's norms, RoPE, residual adds and SiLU-gating (unfused).

    Two RMSNorms read and write the hidden state (4h), two residual adds read two and write one
    (6h), RoPE reads and writes q and k, SiLU(gate) * up reads two intermediates and writes one.
    """
    elements = 10 * hidden + 2 * (q_dim + kv_dim) + 3 * intermediate
    return tokens * elements * dtype_bytes


def ring_allreduce_wire_bytes(message_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce: reduce-scatter plus all-gather."""
    return 2.0 * (ranks - 1) / ranks * message_bytes if ranks > 1 else 0.0


def allgather_wire_bytes(bytes_per_rank: float, ranks: int) -> float:
    """Bytes each rank receives in a ring all-gather of `bytes_per_rank` from every rank."""
    return (ranks - 1) * bytes_per_rank if ranks > 1 else 0.0


@dataclass(frozen=True, slots=True)
class Terms:
    """A time split into additive terms, each linear in one coefficient of the profile.

    The first five fields are ideal seconds (work / peak rate at 100% efficiency), charged to the
    coefficient whose roofline branch was the binding one; `latency` is fixed seconds; the last
    three count what the profile's per-layer, per-sequence-layer and per-iteration overheads
    multiply.
    """

    matmul: float = 0.0
    attention: float = 0.0
    memory: float = 0.0
    kv_read: float = 0.0
    collective: float = 0.0
    latency: float = 0.0
    layers: float = 0.0
    sequence_layers: float = 0.0
    iterations: float = 0.0
    gathered_kv: float = 0.0
    """Cached KV tokens copied before attention, summed over layers (see kv_gather_s)."""

    def __add__(self, other: Terms) -> Terms:
        return Terms(
            self.matmul + other.matmul,
            self.attention + other.attention,
            self.memory + other.memory,
            self.kv_read + other.kv_read,
            self.collective + other.collective,
            self.latency + other.latency,
            self.layers + other.layers,
            self.sequence_layers + other.sequence_layers,
            self.iterations + other.iterations,
            self.gathered_kv + other.gathered_kv,
        )

    def scaled(self, factor: float) -> Terms:
        return Terms(
            self.matmul * factor,
            self.attention * factor,
            self.memory * factor,
            self.kv_read * factor,
            self.collective * factor,
            self.latency * factor,
            self.layers * factor,
            self.sequence_layers * factor,
            self.iterations * factor,
            self.gathered_kv * factor,
        )

    def seconds_by_term(self, eff: Efficiency) -> dict[str, float]:
        """Real seconds per term under `eff`; the values sum to `seconds(eff)`."""
        return {
            "matmul": self.matmul / eff.matmul,
            "attention": self.attention / eff.attention,
            "memory": self.memory / eff.memory,
            "kv_read": self.kv_read / eff.kv_read,
            "collective": self.collective / eff.collective,
            "latency": self.latency,
            "overhead": self.layers * eff.layer_overhead_s
            + self.sequence_layers * eff.sequence_overhead_s
            + self.iterations * eff.iteration_overhead_s,
            "kv_gather": self.gathered_kv * eff.kv_gather_s,
        }

    def seconds(self, eff: Efficiency) -> float:
        return sum(self.seconds_by_term(eff).values())
