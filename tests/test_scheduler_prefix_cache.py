"""Prefix caching in the scheduler: full blocks (of the prompt, then of the output) are shared
by hash once computed, a hit skips whole blocks and never the last token, unreferenced cached
blocks count as free and are evicted least recently released first. The driver's checker
verifies every reused block holds the same prefix, every cached block the prefix it is
registered under, and that no step writes into a shared block."""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medha.errors import InvalidRequestError
from medha.scheduler import POLICY_NAMES, SchedRequest, SchedulerConfig
from medha.scheduler.blocks import CachingAllocator
from medha.scheduler.prefix_cache import block_hashes
from tests.scheduler_support import Arrival, drive, drive_random_workload, make_scheduler, step


def test_block_hashes_name_whole_prefixes() -> None:
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the trailing 8 tokens make no full block
    b = block_hashes([*range(16), 99, *range(17, 40)], 16)
    assert a[0] == b[0] and a[1] != b[1]
    # The same block after another prefix is another prefix.
    assert block_hashes([*range(16, 32)], 16)[0] != a[1]


def test_a_long_prompts_digests_match_block_by_block_ones_across_its_packs() -> None:
    """Packed 64K ids at a time, a 200K-token prompt's digests are those of hashing each
    block after the ones before, whichever pack a block's ids came from."""
    rng = random.Random(7)
    ids = [rng.randrange(1 << 40) for _ in range(3 * 65_536 + 40)]
    ids[65_535:65_537] = [1 << 62, 5]  # a block across the first packs' boundary
    parent = b""
    expected = []
    for start in range(0, len(ids) - 15, 16):
        parent = hashlib.sha256(parent + array("q", ids[start : start + 16]).tobytes()).digest()
        expected.append(parent)
    assert block_hashes(ids, 16) == tuple(expected)
    assert block_hashes(ids[:65_540], 16, b"parent")[0] != expected[0]


def test_the_allocator_evicts_unreferenced_cached_blocks_last_and_oldest_first() -> None:
    allocator = CachingAllocator(4)
    blocks = allocator.allocate(3)
    for digest, block in zip((b"a", b"b", b"c"), blocks, strict=True):
        assert allocator.cache.register(digest, block)
    allocator.free([blocks[1]])
    allocator.free([blocks[0], blocks[2]])
    assert allocator.num_free == 4  # cached but unreferenced blocks count as free
    assert allocator.allocate(1) == [3]  # the never-used block first
    assert allocator.allocate(1) == [blocks[1]]  # then the least recently released
    assert allocator.cache.lookup(b"b") is None and allocator.cache.lookup(b"a") == blocks[0]
    allocator.cache.acquire(blocks[0])
    assert allocator.num_free == 1
    assert not allocator.cache.register(b"a", blocks[2])  # that prefix has its block


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(length)]


def test_a_request_that_starts_like_a_computed_one_skips_the_shared_blocks() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)
    doc = _prompt(1, 300)
    scheduler.add_request("a", 300, 2, arrival=0.0, block_hashes=block_hashes(doc, 16))
    (a_first, _) = step(scheduler, 0.0)
    a_blocks = a_first.seqs[0].new_blocks[0][1]
    question = [*doc[:256], *_prompt(2, 40)]  # shares 16 blocks
    scheduler.add_request("b", 296, 2, arrival=1.0, block_hashes=block_hashes(question, 16))
    plan, _ = step(scheduler, 1.0)
    (b_seq,) = [seq for seq in plan.seqs if seq.request_id == "b"]
    assert b_seq.start == 256
    assert b_seq.new_blocks[0][1][:16] == a_blocks[:16]
    assert b_seq.new_blocks[0][1][16] not in a_blocks
    # The same prompt again: all but its last block come from the cache (18 of 19 blocks,
    # 288 tokens; the last token's block is computed).
    scheduler.add_request("c", 300, 2, arrival=2.0, block_hashes=block_hashes(doc, 16))
    plan, _ = step(scheduler, 2.0)
    (c_seq,) = [seq for seq in plan.seqs if seq.request_id == "c"]
    assert c_seq.start == 288 and c_seq.new_blocks[0][1][:18] == a_blocks[:18]


def _until_done(scheduler: Any, request_id: str, now: float) -> float:
    while (request := scheduler.get(request_id)) is not None and not request.status.is_done:
        step(scheduler, now)
        now += 0.01
    return now


def test_a_request_that_does_not_read_the_cache_computes_its_prompt_and_fills_it() -> None:
    # A request that scores its prompt (prompt logprobs) must compute every position.
    scheduler = make_scheduler(target_batch_time=0.05)
    doc = _prompt(1, 300)
    hashes = block_hashes(doc, 16)
    scorer = scheduler.add_request(
        "s", 300, 2, arrival=0.0, block_hashes=hashes, scores_prompt=True
    )
    now = _until_done(scheduler, "s", 0.0)
    # It filled the cache like any request: a reader takes its 18 blocks.
    scheduler.add_request("a", 300, 2, arrival=now, block_hashes=hashes)
    plan, _ = step(scheduler, now)
    assert plan.seqs[0].start == 288 and scheduler.stats().prefix_hit_blocks == 18
    now = _until_done(scheduler, "a", now)
    # Another one that does not read: nothing cached counts for it, and it starts at 0.
    later = scheduler.add_request("t", 300, 2, arrival=now, block_hashes=hashes, scores_prompt=True)
    assert later.cached_at_arrival == 0 and scorer.cached_at_arrival == 0
    plan, _ = step(scheduler, now)
    assert plan.seqs[0].start == 0 and scheduler.stats().prefix_hit_blocks == 18


def test_a_prompt_of_whole_blocks_still_computes_its_last_block() -> None:
    scheduler = make_scheduler()
    prompt = _prompt(3, 64)
    for index, now in enumerate((0.0, 1.0)):
        scheduler.add_request(
            f"r{index}", 64, 1, arrival=now, block_hashes=block_hashes(prompt, 16)
        )
        plan, _ = step(scheduler, now)
    assert plan.seqs[0].start == 48 and plan.seqs[0].q_tokens == 16


def test_blocks_shared_with_a_running_request_need_no_free_memory_to_admit() -> None:
    # 40 blocks: "a" holds 31 (a 490-token prompt, decoding); "b" shares its first 30 and
    # needs 2 more, which are free, though its 32 blocks in all are not.
    scheduler = make_scheduler(num_blocks=40, target_batch_time=0.05)
    doc = _prompt(4, 480)
    a_prompt, b_prompt = [*doc, *_prompt(5, 10)], [*doc, *_prompt(6, 20)]
    scheduler.add_request("a", 490, 100, arrival=0.0, block_hashes=block_hashes(a_prompt, 16))
    for now in range(3):
        step(scheduler, float(now))
    scheduler.add_request("b", 500, 2, arrival=3.0, block_hashes=block_hashes(b_prompt, 16))
    plan, _ = step(scheduler, 3.0)
    (b_seq,) = [seq for seq in plan.seqs if seq.request_id == "b"]
    assert b_seq.start == 480


def test_a_shared_system_prompt_does_not_pin_every_request_to_one_replica() -> None:
    # Two data-parallel groups; every prompt starts with the same 32-token system prompt.
    # Saving its two blocks' work must not outweigh a replica's queue.
    scheduler = make_scheduler(kvp_groups=2, num_blocks=4000)
    system = _prompt(7, 32)
    arrivals = []
    for index in range(40):
        prompt = [*system, *_prompt(300 + index, random.Random(index).randint(200, 3000))]
        hashes = block_hashes(prompt, 16)
        arrivals.append(Arrival(f"r{index}", 0.05 * index, len(prompt), 200, block_hashes=hashes))
    placed: dict[str, int] = {}
    start = scheduler.table.start

    def record(request: SchedRequest, first: int, now: float, hit: Sequence[int] = ()) -> Any:
        placed[request.request_id] = first
        return start(request, first, now, hit)

    scheduler.table.start = record  # type: ignore[method-assign]
    drive(scheduler, arrivals)
    groups = list(placed.values())
    assert min(groups.count(0), groups.count(1)) >= 15


def test_a_cached_prompt_is_ranked_and_given_a_deadline_by_what_is_left_to_compute() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)
    doc = _prompt(8, 30_000)
    scheduler.add_request("doc", 30_000, 1, arrival=0.0, block_hashes=block_hashes(doc, 16))
    now = 0.0
    while scheduler.get("doc") is not None:
        step(scheduler, now)
        now += 0.05
    question = [*doc, *_prompt(9, 20)]
    follow_up = scheduler.add_request(
        "q", len(question), 1, arrival=now, block_hashes=block_hashes(question, 16)
    )
    alone = scheduler.add_request("q-uncached", len(question), 1, arrival=now)
    assert follow_up.cached_at_arrival == 30_000 - 30_000 % 16
    assert follow_up.total_prefill_s < alone.total_prefill_s / 50
    assert follow_up.deadline == 0.5  # the floor: its own work is a fraction of a second


def test_a_request_placed_where_its_prefix_is_not_cached_counts_its_whole_prefill() -> None:
    # Cached on group 0 when it arrives, but group 0 is busy with a long prompt: it starts on
    # group 1 with no hit, and from then on its remaining work is the whole prompt's.
    scheduler = make_scheduler(kvp_groups=2, num_blocks=4000, policy="lars")
    doc = _prompt(10, 4000)
    scheduler.add_request("a", 4001, 1, 0.0, block_hashes=block_hashes([*doc, 1], 16))
    now = 0.0
    while scheduler.has_work:
        step(scheduler, now)
        now += 0.1
    scheduler.add_request("long", 30_000, 1, now)
    step(scheduler, now)
    prompt = [*doc, *[2] * 8]
    b = scheduler.add_request("b", len(prompt), 1, now, block_hashes=block_hashes(prompt, 16))
    assert b.cached_at_arrival == 4000
    plan, _ = step(scheduler, now + 0.05)
    (seq,) = [seq for seq in plan.seqs if seq.request_id == "b"]
    assert seq.start == 0 and seq.groups == (1,)
    whole = scheduler.cost.prefill_time(len(prompt))
    assert b.remaining_prefill_s(scheduler.cost, 0) == whole


def test_a_block_its_output_fills_is_shared_once_its_last_token_is_computed() -> None:
    scheduler = make_scheduler()
    conversation = _prompt(4, 60)  # a 20-token prompt and its 40-token answer
    hashes = block_hashes(conversation, 16)
    a = scheduler.add_request("a", 20, 40, arrival=0.0, block_hashes=hashes[:1])
    now = 0.0
    while a.known_tokens < 32:
        now += 0.01
        step(scheduler, now)
    # The token at position 31 was just sampled: the engine hashes block 1, whose last
    # token's KV the next step computes.
    scheduler.add_block_hashes("a", hashes[1:2])
    assert a.computed == 31 and a.registered_blocks == 1
    follow_up = conversation[:40]

    def first_chunk_start(request_id: str) -> int:
        nonlocal now
        scheduler.add_request(request_id, 40, 1, now, block_hashes=block_hashes(follow_up, 16))
        now += 0.01
        plan, _ = step(scheduler, now)
        (seq,) = [seq for seq in plan.seqs if seq.request_id == request_id]
        return seq.start

    assert first_chunk_start("b") == 16
    assert a.computed == 32 and a.registered_blocks == 2
    assert first_chunk_start("c") == 32
    with pytest.raises(InvalidRequestError, match="block hashes for 34 known tokens"):
        scheduler.add_block_hashes("a", hashes[2:3])


@st.composite
def configs(
    draw: st.DrawFn,
    num_blocks: tuple[int, int] = (40, 120),
    limits: tuple[int, int] = (128, 256),
    budgets: tuple[float, ...] = (0.01, 0.03),
) -> SchedulerConfig:
    kvp = draw(st.sampled_from([1, 2, 3]))
    limit = draw(st.sampled_from([None, *limits])) if kvp > 1 else None
    return SchedulerConfig(
        policy=draw(st.sampled_from(POLICY_NAMES)),
        kvp_groups=kvp,
        max_tokens_per_kvp_group=limit,
        pp_stages=draw(st.sampled_from([1, 2, 3])),
        spp=draw(st.booleans()),
        num_blocks=draw(st.integers(*num_blocks)),
        target_batch_time=draw(st.sampled_from(budgets)),
        max_batch_size=draw(st.integers(2, 16)),
        fixed_chunk=draw(st.sampled_from([64, 512])),
    )


@st.composite
def workloads(
    draw: st.DrawFn, documents_up_to: int = 600, outputs_up_to: int = 30
) -> list[Arrival]:
    # A few documents, each asked about several times, and conversations that go on from an
    # earlier request's prompt and output: prompts share whole-block prefixes, some of them
    # blocks an output filled (or would have, had it not stopped or been aborted first).
    documents = [_prompt(seed, draw(st.integers(1, documents_up_to))) for seed in range(3)]
    arrivals: list[Arrival] = []
    conversations: list[list[int]] = []  # each arrival's prompt + the output it would give
    for index in range(draw(st.integers(1, 14))):
        arrival = draw(st.floats(0.0, 1.0))
        if arrivals and draw(st.booleans()):  # a next turn: into the earlier one's output
            turn = draw(st.integers(0, len(arrivals) - 1))
            document = conversations[turn]
            shared = draw(st.integers(arrivals[turn].prompt_len, len(document)))
            arrival = arrivals[turn].arrival + draw(st.floats(0.0, 3.0))
        else:
            document = documents[draw(st.integers(0, 2))]
            shared = draw(st.integers(0, len(document)))
        prompt = [*document[:shared], *_prompt(100 + index, draw(st.integers(0, 80)))] or [1]
        max_new_tokens = draw(st.integers(1, outputs_up_to))
        conversation = [*prompt, *_prompt(200 + index, max_new_tokens)]
        conversations.append(conversation)
        arrivals.append(drawn_arrival(draw, f"r{index}", arrival, prompt, conversation, 1.0))
    return arrivals


def drawn_arrival(
    draw: st.DrawFn,
    request_id: str,
    arrival: float,
    prompt: list[int],
    conversation: list[int],
    aborts_within: float,
    **fields: Any,
) -> Arrival:
    """`hashed_arrival`, which may stop early or be aborted within `aborts_within` seconds."""
    outputs = len(conversation) - len(prompt)
    aborting = draw(st.booleans())
    return hashed_arrival(
        request_id,
        arrival,
        prompt,
        conversation,
        stop_after=draw(st.none() | st.integers(1, outputs)),
        abort_at=arrival + draw(st.floats(0.0, aborts_within)) if aborting else None,
        **fields,
    )


def hashed_arrival(
    request_id: str,
    arrival: float,
    prompt: list[int],
    conversation: list[int],
    **fields: Any,
) -> Arrival:
    """An arrival of `prompt` whose output would continue it into `conversation`, with the
    digests of both (the driver hands the output's over as its tokens fill them)."""
    prompt_hashes = block_hashes(prompt, 16)
    return Arrival(
        request_id=request_id,
        arrival=arrival,
        prompt_len=len(prompt),
        max_new_tokens=len(conversation) - len(prompt),
        block_hashes=prompt_hashes,
        output_hashes=block_hashes(conversation, 16)[len(prompt_hashes) :],
        **fields,
    )


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(config=configs(), arrivals=workloads())
def test_shared_prefixes_under_preemption_eviction_and_aborts_finish_without_a_leak(
    config: SchedulerConfig, arrivals: list[Arrival]
) -> None:
    # The checker verifies every reused block against the prefix it holds, and every block in
    # a prefix cache against the prefix it is registered under; at the end every block is
    # free again (cached ones count as free).
    drive_random_workload(config, arrivals)


@PROPERTY_SETTINGS
@given(
    config=configs(num_blocks=(12, 40), limits=(64, 128)),
    arrivals=workloads(documents_up_to=300, outputs_up_to=200),
)
def test_conversations_with_long_outputs_in_a_small_cache_finish_without_a_leak(
    config: SchedulerConfig, arrivals: list[Arrival]
) -> None:
    # Outputs that outgrow the cache: decodes preempt requests holding shared and output
    # blocks, which restart past whatever of their own blocks is still cached.
    drive_random_workload(config, arrivals)
