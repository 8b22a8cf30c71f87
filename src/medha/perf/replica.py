"""The shape of one model replica as the cost model sees it: TP x PP x KVP.

Placement follows DESIGN section 9 (TP innermost, then KVP, then PP): a collective whose ranks
span at most one node's GPUs runs over NVLink, anything wider over the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.model.arch import ModelArch


@dataclass(frozen=True)
class ReplicaSpec:
    """Degrees of parallelism of one replica, and where KVP shards split a long sequence."""

    tp: int = 1
    pp: int = 1
    kvp: int = 1
    kvp_max_tokens_per_group: int | None = None
    """M: KV tokens one KVP group holds for one request before the next group onboards. None:
    a request never spreads (with kvp > 1 the groups are data-parallel replicas only)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "kvp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kvp_max_tokens_per_group is not None and self.kvp_max_tokens_per_group < 1:
            raise ValueError("kvp_max_tokens_per_group must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.kvp

    def tp_spans_one_node(self, gpus_per_node: int) -> bool:
        return self.tp <= gpus_per_node

    def kvp_spans_one_node(self, gpus_per_node: int) -> bool:
        # A KVP group's ranks are tp apart; all kvp groups of a stage span tp * kvp ranks.
        return self.tp * self.kvp <= gpus_per_node

    def pp_neighbours_share_node(self, gpus_per_node: int) -> bool:
        # Adjacent stages are tp * kvp ranks apart: both fit in a node only if 2 * tp * kvp do.
        return 2 * self.tp * self.kvp <= gpus_per_node

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Layer counts of each stage: as even as possible, earlier stages take the remainder."""
        if num_layers < self.pp:
            raise ValueError(f"{num_layers} layers cannot fill {self.pp} pipeline stages")
        base, extra = divmod(num_layers, self.pp)
        return [base + (1 if stage < extra else 0) for stage in range(self.pp)]

    def kvp_groups_at(self, kv_tokens: int) -> int:
        """KVP groups a request's KV is spread over once `kv_tokens` are cached (plus new ones)."""
        if self.kvp == 1 or self.kvp_max_tokens_per_group is None:
            return 1
        return min(self.kvp, kv_tokens // self.kvp_max_tokens_per_group + 1)

    def check_shards(self, arch: ModelArch) -> None:
        """ValueError unless `arch` splits over this replica: tp dividing its heads (or its KV
        heads dividing tp, which then replicates them) and its MLP, pp at most its layers."""
        tp = self.tp
        problems = []
        if arch.num_heads % tp:
            problems.append(f"num_heads={arch.num_heads}")
        if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
            problems.append(f"num_kv_heads={arch.num_kv_heads}")
        if arch.intermediate_size % tp:
            problems.append(f"intermediate_size={arch.intermediate_size}")
        if problems:
            raise ValueError(f"tp={tp} does not divide {', '.join(problems)}")
        if arch.num_layers < self.pp:
            raise ValueError(f"pp={self.pp} exceeds the model's {arch.num_layers} layers")
