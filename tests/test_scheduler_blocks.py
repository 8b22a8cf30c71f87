"""Paged block allocator and KVP placement arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.scheduler import KvShard, SchedulerConfig
from medha.scheduler.blocks import BlockAllocator, BlockPool, OutOfBlocksError
from medha.scheduler.kvp import KvpLayout
from medha.scheduler.request import SchedRequest


def _request(prompt_len: int = 100) -> SchedRequest:
    return SchedRequest("r", 0.0, prompt_len, 10, 1.0, False, 0.1, 0)


def test_allocator_hands_out_distinct_ids_and_counts_free_blocks() -> None:
    allocator = BlockAllocator(10)
    first = allocator.allocate(4)
    second = allocator.allocate(6)
    assert sorted(first + second) == list(range(10))
    assert allocator.num_free == 0 and allocator.num_used == 10
    allocator.free(first)
    assert allocator.num_free == 4
    assert sorted(allocator.allocate(4)) == sorted(first)


def test_allocator_refuses_more_blocks_than_free() -> None:
    allocator = BlockAllocator(3)
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(4)
    assert allocator.num_free == 3


def test_freeing_a_block_twice_or_an_unknown_block_raises() -> None:
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(2)
    allocator.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free(blocks[:1])
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free([99])
    held = allocator.allocate(1)
    with pytest.raises(ValueError):
        allocator.free(held + held)
    assert allocator.num_free == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 8)), max_size=60))
def test_random_allocate_free_sequences_never_lose_or_duplicate_blocks(
    ops: list[tuple[bool, int]],
) -> None:
    allocator = BlockAllocator(32)
    held: list[list[int]] = []
    for is_allocation, count in ops:
        if is_allocation and count <= allocator.num_free:
            held.append(allocator.allocate(count))
        elif held:
            allocator.free(held.pop(count % len(held)))
        owned = [block for blocks in held for block in blocks]
        assert len(owned) == len(set(owned))
        assert allocator.num_free + len(owned) == 32


def test_pool_reports_free_and_total_blocks_per_group() -> None:
    pool = BlockPool(num_groups=2, blocks_per_group=5)
    pool.allocate(1, 3)
    assert pool.free_counts == (5, 2)
    assert pool.total_counts == (5, 5)


def test_tokens_beyond_m_live_on_the_next_groups_in_blocks_of_their_own() -> None:
    layout = KvpLayout(SchedulerConfig(kvp_groups=3, max_tokens_per_kvp_group=64, block_size=16))
    assert layout.blocks_by_group_index(64) == [4]
    assert layout.blocks_by_group_index(65) == [4, 1]
    assert layout.blocks_by_group_index(150) == [4, 4, 2]
    assert [layout.group_index(p) for p in (0, 63, 64, 128)] == [0, 0, 1, 2]
    assert layout.tokens_to_boundary(0) == 64
    assert layout.tokens_to_boundary(70) == 58


def test_without_m_a_request_stays_on_one_group() -> None:
    layout = KvpLayout(SchedulerConfig(kvp_groups=4, block_size=16, num_blocks=8))
    assert layout.blocks_by_group_index(128) == [8]
    assert layout.tokens_to_boundary(100) is None
    assert layout.can_ever_fit(128)
    assert not layout.can_ever_fit(129)


def test_a_request_fits_only_if_its_span_fits_the_groups_it_may_use() -> None:
    layout = KvpLayout(
        SchedulerConfig(kvp_groups=2, max_tokens_per_kvp_group=64, block_size=16, num_blocks=4)
    )
    assert layout.can_ever_fit(128)
    assert not layout.can_ever_fit(129)  # would need a third group


@settings(max_examples=200, deadline=None)
@given(
    groups=st.integers(1, 4),
    limit_blocks=st.one_of(st.none(), st.integers(1, 12)),
    num_blocks=st.integers(1, 10),
)
def test_max_request_tokens_is_the_largest_length_that_can_ever_fit(
    groups: int, limit_blocks: int | None, num_blocks: int
) -> None:
    config = SchedulerConfig(
        kvp_groups=groups,
        max_tokens_per_kvp_group=None if limit_blocks is None else 16 * limit_blocks,
        block_size=16,
        num_blocks=num_blocks,
    )
    layout = KvpLayout(config)
    most = layout.max_request_tokens()
    assert layout.can_ever_fit(most)
    assert not layout.can_ever_fit(most + 1)


def test_reservation_spans_consecutive_groups_and_shards_cover_the_prefix() -> None:
    config = SchedulerConfig(kvp_groups=3, max_tokens_per_kvp_group=64, block_size=16)
    layout, pool = KvpLayout(config), BlockPool(3, config.num_blocks)
    request = _request(prompt_len=150)
    request.prefill_len = 150
    new_blocks = layout.reserve(request, first=2, pool=pool)
    assert request.groups == (2, 0, 1)
    assert [(group, len(ids)) for group, ids in new_blocks] == [(2, 4), (0, 4), (1, 2)]
    assert layout.shards(request, 0) == (KvShard(2, 0, 0),)
    assert layout.shards(request, 64) == (KvShard(2, 0, 64), KvShard(0, 64, 64))
    assert layout.shards(request, 140) == (
        KvShard(2, 0, 64),
        KvShard(0, 64, 128),
        KvShard(1, 128, 140),
    )
    assert layout.active_groups(request, 140) == (2, 0, 1)
    layout.release(request, pool)
    assert pool.free_counts == pool.total_counts


def test_decode_growth_needs_a_block_at_block_boundaries_and_onboards_the_next_group() -> None:
    config = SchedulerConfig(kvp_groups=2, max_tokens_per_kvp_group=32, block_size=16)
    layout, pool = KvpLayout(config), BlockPool(2, config.num_blocks)
    request = _request(prompt_len=20)
    request.prefill_len = 20
    layout.reserve(request, first=1, pool=pool)
    assert layout.group_needing_block(request, 20) is None  # block 1 already holds 16..31
    assert layout.group_needing_block(request, 31) is None
    assert layout.group_needing_block(request, 32) == 0  # crosses M: onboard group 0
    layout.append_block(request, 32, pool.allocate(0, 1)[0])
    assert request.groups == (1, 0)
    assert layout.group_needing_block(request, 47) is None
    assert layout.group_needing_block(request, 48) == 0


def test_feasible_first_groups_need_free_blocks_on_every_group_of_the_span() -> None:
    config = SchedulerConfig(kvp_groups=3, max_tokens_per_kvp_group=32, block_size=16, num_blocks=2)
    layout, pool = KvpLayout(config), BlockPool(3, 2)
    pool.allocate(1, 2)
    assert layout.feasible_first_groups(48, pool) == [2]  # spans (2, 0); 0->1 and 1->2 do not
    assert layout.feasible_first_groups(16, pool) == [0, 2]
