"""The rank layout of a TP x PP x KVP replica: one frozen object every process group is built from.

As the Medha paper's 3D parallelism (docs/parallelism.md): world = tp * pp * kvp and

    rank = pp_rank * (kvp * tp) + kvp_rank * tp + tp_rank

TP is innermost so a TP group (consecutive ranks) sits on one node and its per-layer all-reduces
stay on NVLink; the KVP groups of one stage come next; pipeline stages, which exchange only one
hidden-state tensor per micro-batch, are the outermost (and may span nodes).

- TP group:  same (pp_rank, kvp_rank), every tp_rank       -> consecutive ranks
- KVP group: same (pp_rank, tp_rank), every kvp_rank       -> ranks tp apart
- PP group:  same (kvp_rank, tp_rank), every pp_rank       -> ranks kvp * tp apart

Pure Python (no torch): the launcher, the docs and the tests read it without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The KVP group whose last stage samples every token (its TP rank 0: `sampler_rank`); the
# scheduler prices its LM-head rows there.
from medha.scheduler.plan import SAMPLING_GROUP


class RankCoords(NamedTuple):
    pp: int
    kvp: int
    tp: int


@dataclass(frozen=True)
class RankLayout:
    tp: int = 1
    pp: int = 1
    kvp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "kvp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.kvp

    def rank(self, pp: int, kvp: int, tp: int) -> int:
        if not (0 <= pp < self.pp and 0 <= kvp < self.kvp and 0 <= tp < self.tp):
            raise ValueError(f"coordinates (pp={pp}, kvp={kvp}, tp={tp}) are outside {self}")
        return pp * (self.kvp * self.tp) + kvp * self.tp + tp

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        pp, rest = divmod(rank, self.kvp * self.tp)
        kvp, tp = divmod(rest, self.tp)
        return RankCoords(pp, kvp, tp)

    # -- the groups a rank belongs to, as sorted rank lists ---------------------------------

    def tp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(c.pp, c.kvp, t) for t in range(self.tp)]

    def kvp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(c.pp, k, c.tp) for k in range(self.kvp)]

    def pp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(p, c.kvp, c.tp) for p in range(self.pp)]

    # -- every group of a kind, in one order all ranks agree on -----------------------------
    # torch.distributed.new_group must be called by every rank for every group, in the same
    # order, even for groups the rank is not in.

    def all_tp_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, k, t) for t in range(self.tp)]
            for p in range(self.pp)
            for k in range(self.kvp)
        ]

    def all_kvp_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, k, t) for k in range(self.kvp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def all_pp_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, k, t) for p in range(self.pp)]
            for k in range(self.kvp)
            for t in range(self.tp)
        ]

    # -- pipeline neighbours ---------------------------------------------------------------

    def next_stage(self, rank: int) -> int | None:
        """The rank this rank sends its hidden states to (same kvp and tp rank), if any."""
        c = self.coords(rank)
        return None if c.pp == self.pp - 1 else self.rank(c.pp + 1, c.kvp, c.tp)

    def prev_stage(self, rank: int) -> int | None:
        c = self.coords(rank)
        return None if c.pp == 0 else self.rank(c.pp - 1, c.kvp, c.tp)

    def stage_ranks(self, pp: int) -> list[int]:
        """Every rank of pipeline stage `pp` (all KVP groups, all TP ranks)."""
        return [self.rank(pp, k, t) for k in range(self.kvp) for t in range(self.tp)]

    def kvp_group_ranks(self, kvp: int) -> list[int]:
        """Every rank of KVP group `kvp`: one full TP x PP model replica."""
        return [self.rank(p, kvp, t) for p in range(self.pp) for t in range(self.tp)]

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: last stage, KVP group 0, TP rank 0. It samples every token,
        from its group's final hidden states and those other groups send it of the sequences
        they run alone (medha.parallel.placement); after the TP all-gather every TP rank holds
        the same logits, so one rank suffices."""
        return self.rank(self.pp - 1, SAMPLING_GROUP, 0)


def split_layers(num_layers: int, pp: int) -> list[range]:
    """Layer range of each stage: as even as possible, earlier stages take the remainder (the
    cost model's ReplicaSpec.layers_per_stage splits the same way)."""
    if num_layers < pp:
        raise ValueError(f"{num_layers} layers cannot fill {pp} pipeline stages")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        count = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges
