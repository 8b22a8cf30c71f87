"""torch.distributed process groups of one worker, built from the RankLayout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from medha.parallel.layout import RankLayout


@dataclass(frozen=True)
class ProcessGroups:
    tp: Any
    kvp: Any
    pp: Any


def build_groups(layout: RankLayout, rank: int) -> ProcessGroups:
    """This rank's TP, KVP and PP groups. Every rank creates every group, in the same order
    (torch.distributed.new_group is collective over the whole world)."""
    found: dict[str, Any] = {}
    for kind, all_groups, mine in (
        ("tp", layout.all_tp_groups(), layout.tp_group(rank)),
        ("kvp", layout.all_kvp_groups(), layout.kvp_group(rank)),
        ("pp", layout.all_pp_groups(), layout.pp_group(rank)),
    ):
        for ranks in all_groups:
            group = dist.new_group(ranks)
            if ranks == mine:
                found[kind] = group
    return ProcessGroups(found["tp"], found["kvp"], found["pp"])
