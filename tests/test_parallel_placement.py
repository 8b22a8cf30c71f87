"""Which KVP group runs what of a step (medha.parallel.placement), and the merge of attention
partials over a buffer that only some of the groups' rows fill (medha.parallel.kvp.KvpMerge),
in one process: the collective is simulated by threads."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import medha
from medha.kernels.merge import merge_attention_partials
from medha.parallel import kvp as kvp_module
from medha.parallel.kvp import KvpMerge
from medha.parallel.messages import ShardWork, head_rows
from medha.parallel.placement import seq_works
from medha.sampling import SamplingSetup
from medha.scheduler.plan import KvShard, ScheduledSeq, SeqKind

SETUP = SamplingSetup(medha.SamplingParams(max_tokens=4), prompt_len=3)
MASK = object()


def _seq(
    shards: list[tuple[int, int, int]],
    new_blocks: tuple[tuple[int, tuple[int, ...]], ...] = (),
    *,
    start: int = 0,
    end: int = 3,
    samples: bool = True,
) -> ScheduledSeq:
    return ScheduledSeq(
        "r",
        SeqKind.PREFILL,
        start,
        end,
        tuple(KvShard(*shard) for shard in shards),
        new_blocks,
        samples,
    )


def _works(seq: ScheduledSeq, kvp: int, merge_offset: int | None = None) -> list[Any]:
    return seq_works(
        seq,
        kvp,
        tokens=tuple(range(seq.start, seq.end)),
        sampling=SETUP,
        score_rows=range(0, 2),
        token_mask=MASK,
        merge_offset=merge_offset,
    )


def test_a_short_request_runs_on_its_group_alone_and_reports_to_the_sampling_group() -> None:
    sampler, own, other = _works(_seq([(1, 0, 0)], ((1, (5, 6)),)), kvp=3)
    assert other is None  # group 2 has nothing to do with it
    assert own.runs and own.appends and own.new_blocks == (5, 6)
    assert own.reporter == 1 and own.score_rows == range(0, 2)  # sends the rows that score
    assert own.sampling is None and own.token_mask is None and own.merge_offset is None
    # Group 0 samples from the rows group 1 sends: it keeps the sampling state, runs nothing.
    assert not sampler.runs and sampler.reporter == 1 and sampler.new_blocks == ()
    assert sampler.sampling is SETUP and sampler.token_mask is MASK
    assert sampler.score_rows == range(0, 2) and sampler.kv_start is None


def test_a_short_request_on_the_sampling_group_goes_nowhere_else() -> None:
    own, other = _works(_seq([(0, 0, 0)], ((0, (5,)),)), kvp=2)
    assert other is None
    assert own.runs and own.reporter is None and own.sampling is SETUP and own.token_mask is MASK


def test_blocks_reserved_on_a_later_group_reach_it_before_it_runs_the_prompt() -> None:
    # A long prompt's first chunk on group 1; its reservation also covers group 2.
    sampler, first, later = _works(_seq([(1, 0, 0)], ((1, (1, 2)), (2, (3,)))), kvp=3)
    assert first.runs and first.new_blocks == (1, 2)
    assert not later.runs and later.new_blocks == (3,) and later.kv_start is None
    assert later.reporter is None and later.score_rows == range(0)
    assert not sampler.runs and sampler.reporter == 1


def test_a_spread_request_runs_on_each_of_its_groups_merged() -> None:
    sampler, second = _works(_seq([(0, 0, 96), (1, 96, 100)], start=100, end=103), 2, 7)
    for work, appends in ((sampler, False), (second, True)):
        assert work.runs and work.merge_offset == 7 and work.appends == appends
        assert work.reporter is None  # the sampling group runs it: nothing to send
    assert (sampler.kv_start, sampler.kv_end) == (0, 96)
    assert (second.kv_start, second.kv_end) == (96, 100)


def test_a_request_spread_over_other_groups_reports_from_its_appending_group() -> None:
    sampler, first, last = _works(_seq([(1, 0, 96), (2, 96, 100)], start=100, end=103), 3, 0)
    assert not sampler.runs and sampler.reporter == 2 and sampler.merge_offset is None
    assert first.runs and first.reporter is None and first.score_rows == range(0)
    assert last.runs and last.reporter == 2 and last.score_rows == range(0, 2)


def test_merged_exactly_when_spread() -> None:
    with pytest.raises(ValueError, match="merged exactly"):
        _works(_seq([(0, 0, 0)]), kvp=2, merge_offset=0)
    with pytest.raises(ValueError, match="merged exactly"):
        _works(_seq([(0, 0, 96), (1, 96, 100)], start=100, end=103), kvp=2)


def test_head_rows() -> None:
    def work(count: int, samples: bool, scores: range) -> ShardWork:
        return ShardWork("r", 0, tuple(range(count)), (), samples, score_rows=scores)

    assert head_rows(work(4, True, range(0)), all_logits=False) == [3]
    assert head_rows(work(4, False, range(0)), all_logits=False) == []
    assert head_rows(work(4, False, range(1, 4)), all_logits=False) == [1, 2, 3]
    assert head_rows(work(4, True, range(0, 2)), all_logits=False) == [0, 1, 3]
    assert head_rows(work(4, True, range(0, 4)), all_logits=False) == [0, 1, 2, 3]
    assert head_rows(work(3, False, range(0)), all_logits=True) == [0, 1, 2]


# -- the merge over a partly filled buffer -------------------------------------------------------

HEADS, DIM = 2, 3


class _FakeCollective:
    """dist.all_gather among threads, one per group; `group` is (this, rank)."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=10)  # a missing call fails, not hangs
        self.slots: list[torch.Tensor | None] = [None] * size
        self.calls = [0] * size

    def all_gather(self, parts: list[torch.Tensor], tensor: torch.Tensor, group: Any) -> None:
        rank = group.rank
        self.slots[rank] = tensor.clone()
        self.calls[rank] += 1
        self.barrier.wait()
        for part, slot in zip(parts, self.slots, strict=True):
            assert slot is not None and slot.shape == tensor.shape
            part.copy_(slot)
        self.barrier.wait()


def _work(request_id: str, count: int, merge_offset: int | None) -> ShardWork:
    return ShardWork(request_id, 0, (0,) * count, (), True, merge_offset=merge_offset)


def test_each_group_merges_only_the_rows_of_the_sequences_spread_over_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three groups. "long" (3 query rows) runs on groups 0 and 1, "wide" (2 rows) on groups 1
    # and 2; "a" runs on group 0 alone, "b" on group 2 alone. Buffer: long at 0, wide at 3.
    batches = {
        0: [_work("a", 2, None), _work("long", 3, 0)],
        1: [_work("long", 3, 0), _work("wide", 2, 3)],
        2: [_work("wide", 2, 3), _work("b", 1, None)],
    }
    generator = torch.Generator().manual_seed(0)
    partials = {
        group: (
            torch.randn(sum(len(w.token_ids) for w in works), HEADS, DIM, generator=generator),
            torch.randn(sum(len(w.token_ids) for w in works), HEADS, generator=generator),
        )
        for group, works in batches.items()
    }
    collective = _FakeCollective(3)
    monkeypatch.setattr(kvp_module.dist, "all_gather", collective.all_gather)
    results: dict[int, torch.Tensor] = {}

    def run(group: int) -> None:
        merge = KvpMerge(SimpleNamespace(rank=group), 3, HEADS, DIM, torch.device("cpu"))
        merge.prepare(batches[group], merge_rows=5)
        results[group] = merge(*partials[group])

    threads = [threading.Thread(target=run, args=(group,)) for group in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert collective.calls == [1, 1, 1]

    def rows(group: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = partials[group]
        return out[start:stop], lse[start:stop]

    long_merged, _ = merge_attention_partials(*zip(rows(0, 2, 5), rows(1, 0, 3), strict=True))
    wide_merged, _ = merge_attention_partials(*zip(rows(1, 3, 5), rows(2, 0, 2), strict=True))
    # A sequence on one group keeps its own output, bit for bit.
    assert torch.equal(results[0][:2], partials[0][0][:2])
    assert torch.equal(results[2][2:], partials[2][0][2:])
    # A spread one gets the exact merge, the same on each of its groups.
    torch.testing.assert_close(results[0][2:], long_merged, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[1][:3], results[0][2:])
    torch.testing.assert_close(results[1][3:], wide_merged, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[2][:2], results[1][3:])


def test_a_group_that_runs_nothing_joins_each_layer_with_neutral_partials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, lse = torch.randn(4, HEADS, DIM), torch.randn(4, HEADS)
    collective = _FakeCollective(2)
    monkeypatch.setattr(kvp_module.dist, "all_gather", collective.all_gather)
    merged: list[torch.Tensor] = []

    def running() -> None:
        merge = KvpMerge(SimpleNamespace(rank=0), 2, HEADS, DIM, torch.device("cpu"))
        merge.prepare([_work("x", 4, 0)], merge_rows=4)
        merged.extend(merge(out, lse) for _ in range(3))

    def idle() -> None:
        merge = KvpMerge(SimpleNamespace(rank=1), 2, HEADS, DIM, torch.device("cpu"))
        merge.prepare([], merge_rows=4)
        merge.join(3)

    threads = [threading.Thread(target=running), threading.Thread(target=idle)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert collective.calls == [3, 3]
    for result in merged:  # the neutral partials leave the one real partial as it is
        assert torch.equal(result, out)


def test_no_collective_without_spread_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no all-gather expected")

    monkeypatch.setattr(kvp_module.dist, "all_gather", refuse)
    merge = KvpMerge(SimpleNamespace(rank=0), 2, HEADS, DIM, torch.device("cpu"))
    merge.prepare([_work("a", 2, None)], merge_rows=0)
    out = torch.randn(2, HEADS, DIM)
    assert merge(out, torch.randn(2, HEADS)) is out
    merge.join(4)
