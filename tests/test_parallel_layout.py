"""The rank layout is docs/parallelism.md's exactly, and ParallelConfig validates its degrees."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

import medha
from medha.parallel.layout import RankLayout, split_layers

LAYOUTS = [RankLayout(tp, pp, kvp) for tp, pp, kvp in itertools.product((1, 2, 3), repeat=3)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_rank_formula_is_pp_major_then_kvp_then_tp(layout: RankLayout) -> None:
    ranks = []
    for pp in range(layout.pp):
        for kvp in range(layout.kvp):
            for tp in range(layout.tp):
                rank = layout.rank(pp, kvp, tp)
                assert rank == pp * (layout.kvp * layout.tp) + kvp * layout.tp + tp
                assert layout.coords(rank) == (pp, kvp, tp)
                ranks.append(rank)
    assert sorted(ranks) == list(range(layout.world_size))
    assert layout.world_size == layout.tp * layout.pp * layout.kvp


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_groups_partition_the_world_along_one_coordinate(layout: RankLayout) -> None:
    for kind, size, varying in (
        ("tp", layout.tp, 2),
        ("kvp", layout.kvp, 1),
        ("pp", layout.pp, 0),
    ):
        groups = getattr(layout, f"all_{kind}_groups")()
        members = sorted(r for g in groups for r in g)
        assert members == list(range(layout.world_size)), kind
        for group in groups:
            assert len(group) == size
            coords = [layout.coords(r) for r in group]
            # Exactly one coordinate varies over a group, through all its values.
            assert sorted(c[varying] for c in coords) == list(range(size))
            fixed = {tuple(v for i, v in enumerate(c) if i != varying) for c in coords}
            assert len(fixed) == 1
            for rank in group:
                assert getattr(layout, f"{kind}_group")(rank) == group


def test_tp_groups_are_consecutive_ranks_and_kvp_groups_are_tp_apart() -> None:
    layout = RankLayout(tp=2, pp=2, kvp=2)
    assert layout.all_tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.all_kvp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.all_pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.next_stage(1) == 5 and layout.prev_stage(5) == 1
    assert layout.next_stage(5) is None and layout.prev_stage(1) is None
    assert layout.stage_ranks(0) == [0, 1, 2, 3]
    assert layout.kvp_group_ranks(1) == [2, 3, 6, 7]
    assert layout.sampler_rank == 4


def test_out_of_range_coordinates_are_refused() -> None:
    layout = RankLayout(tp=2, pp=1, kvp=2)
    with pytest.raises(ValueError):
        layout.rank(1, 0, 0)
    with pytest.raises(ValueError):
        layout.coords(4)
    with pytest.raises(ValueError):
        RankLayout(tp=0)


def test_layers_split_evenly_with_the_remainder_first() -> None:
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(2, 2) == [range(0, 1), range(1, 2)]
    with pytest.raises(ValueError):
        split_layers(1, 2)


def test_parallel_config_is_frozen_validated_and_part_of_engine_config() -> None:
    config = medha.ParallelConfig(tp=2, pp=2, kvp=2, max_tokens_per_kvp_group=64)
    assert config.world_size == 8 and config.spp
    replicas = medha.ParallelConfig(kvp=2)  # no M: requests never spread, groups are replicas
    assert replicas.world_size == 2 and replicas.max_tokens_per_kvp_group is None
    with pytest.raises(ValidationError):
        medha.ParallelConfig(tp=0)
    with pytest.raises(ValidationError):
        config.tp = 4  # type: ignore[misc]
    engine_config = medha.EngineConfig(model="tiny-random", parallel=config)
    assert engine_config.parallel.pp == 2
    assert medha.EngineConfig(model="tiny-random").parallel.world_size == 1


def test_only_the_sampling_rank_is_sent_the_token_masks() -> None:
    import numpy as np

    from medha.parallel.messages import ShardStep, ShardWork, step_for_rank

    layout = RankLayout(tp=2, pp=2, kvp=2)
    mask = np.full(4, -1, dtype=np.int32)

    def work(request_id: str, token_mask: np.ndarray | None) -> ShardWork:
        return ShardWork(request_id, 5, (7,), (), True, token_mask=token_mask)

    group0 = ShardStep(3, 9, (work("a", mask), work("b", None)))
    group1 = ShardStep(3, 9, (work("a", None), work("b", None)))
    sent = {rank: step_for_rank([group0, group1], layout, rank) for rank in range(8)}
    assert sent[layout.sampler_rank] is group0
    for rank, step in sent.items():
        assert step.seqs[0].request_id == "a" and step.seq_no == 3 and step.step_id == 9
        masked = [w.token_mask is not None for w in step.seqs]
        assert masked == [rank == layout.sampler_rank, False]
        if layout.coords(rank).kvp == 1:
            assert step is group1  # nothing to strip: the very same message
