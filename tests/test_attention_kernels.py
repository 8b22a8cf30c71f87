"""The attention entry point returns the right output and log-sum-exp for ragged batches over a
paged cache, and partials over a split KV merge exactly into unsplit attention."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.kernels import AttentionMetadata, merge_attention_partials, paged_attention, write_kv
from medha.kernels.layout import new_kv_pool, seq_views
from tests.runner_support import ShuffledBlocks

BLOCK = 16
HQ, HKV, D = 8, 2, 16
SCALE = D**-0.5


def _dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook attention, computed independently of the paged code: repeat kv heads, mask by
    absolute position, torch.logsumexp and softmax."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * SCALE
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out.float(), lse.T.float()


def _paged_case(
    seqs: list[tuple[int, int]],
    seed: int = 0,
    pool: str = "head-major",
    tables_are: str = "scrambled",
):
    """Fill a paged cache with the keys of sequences given as (cached, new query tokens).

    `pool`: "head-major" (KVCache's memory order) or "token-major" (plain contiguous tensors);
    `tables_are`: "scrambled" block ids, or "consecutive" ones (read in place, not gathered)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = ShuffledBlocks(128, seed)
    k_cache = torch.randn(128, BLOCK, HKV, D, generator=gen)  # garbage everywhere else
    v_cache = torch.randn(128, BLOCK, HKV, D, generator=gen)
    if pool == "head-major":
        k_cache = new_kv_pool(128, BLOCK, HKV, D, torch.float32, "cpu").copy_(k_cache)
        v_cache = new_kv_pool(128, BLOCK, HKV, D, torch.float32, "cpu").copy_(v_cache)
        assert k_cache.permute(2, 0, 1, 3).is_contiguous()
    tables, dense = [], []
    next_block = 0
    for cached, q_len in seqs:
        total = cached + q_len
        if tables_are == "consecutive":
            table = list(range(next_block, next_block + -(-total // BLOCK)))
            next_block = table[-1] + 2  # a gap: neighbours' blocks are not read by mistake
        else:
            table = blocks.take(-(-total // BLOCK))
        k = torch.randn(total, HKV, D, generator=gen)
        v = torch.randn(total, HKV, D, generator=gen)
        q = torch.randn(q_len, HQ, D, generator=gen)
        tables.append(table)
        dense.append((q, k, v, cached))
    meta = AttentionMetadata.build(
        q_lens=[q for _, q in seqs],
        q_start_pos=[c for c, _ in seqs],
        kv_lens=[c + q for c, q in seqs],
        block_tables=tables,
        block_size=BLOCK,
    )
    # Write the cached prefix directly and the new tokens through write_kv, as a model step does.
    for table, (_q, k, v, cached) in zip(tables, dense, strict=True):
        for pos in range(cached):
            k_cache[table[pos // BLOCK], pos % BLOCK] = k[pos]
            v_cache[table[pos // BLOCK], pos % BLOCK] = v[pos]
    new_k = torch.cat([k[c:] for _, k, _, c in dense])
    new_v = torch.cat([v[c:] for _, _, v, c in dense])
    write_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    q_all = torch.cat([q for q, *_ in dense])
    return q_all, k_cache, v_cache, meta, dense


MIXED = [(0, 37), (21, 9), (50, 1), (0, 1), (33, 1), (16, 16), (5, 64)]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize(
    ("pool", "tables_are"),
    [("head-major", "scrambled"), ("head-major", "consecutive"), ("token-major", "scrambled")],
)
def test_output_and_lse_match_dense_attention_on_a_mixed_ragged_batch(
    backend: str, pool: str, tables_are: str
) -> None:
    q, k_cache, v_cache, meta, dense = _paged_case(MIXED, pool=pool, tables_are=tables_are)
    out, lse = paged_attention(q, k_cache, v_cache, meta, SCALE, backend=backend)
    assert lse.dtype == torch.float32
    offset = 0
    for qs, k, v, cached in dense:
        n = qs.shape[0]
        q_pos = torch.arange(cached, cached + n)
        ref_out, ref_lse = _dense_reference(qs, k, v, q_pos, torch.arange(k.shape[0]))
        torch.testing.assert_close(out[offset : offset + n], ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[offset : offset + n], ref_lse, rtol=1e-5, atol=1e-5)
        offset += n


def test_sdpa_backend_equals_reference_backend() -> None:
    q, k_cache, v_cache, meta, _ = _paged_case(MIXED, seed=3)
    ref = paged_attention(q, k_cache, v_cache, meta, SCALE, backend="reference")
    fused = paged_attention(q, k_cache, v_cache, meta, SCALE, backend="sdpa")
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)


def _shard_partials(q, k, v, q_start: int, cuts: list[int], backend: str):
    """Attention of q over each KV shard [cuts[j], cuts[j+1]) alone, as KVP groups compute it."""
    outs, lses = [], []
    for lo, hi in itertools.pairwise(cuts):
        n = hi - lo
        table = list(range(-(-max(n, 1) // BLOCK)))
        k_cache = torch.zeros(len(table), BLOCK, HKV, D)
        v_cache = torch.zeros(len(table), BLOCK, HKV, D)
        k_cache.view(-1, HKV, D)[:n] = k[lo:hi]
        v_cache.view(-1, HKV, D)[:n] = v[lo:hi]
        meta = AttentionMetadata.build(
            q_lens=[q.shape[0]],
            q_start_pos=[q_start],
            kv_lens=[n],
            kv_start_pos=[lo],
            block_tables=[table],
            block_size=BLOCK,
            appends=[False],
        )
        out, lse = paged_attention(q, k_cache, v_cache, meta, SCALE, backend=backend)
        outs.append(out)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@settings(max_examples=30, deadline=None)
@given(
    kv_len=st.integers(1, 120),
    q_len=st.integers(1, 24),
    parts=st.integers(1, 5),
    data=st.data(),
)
def test_merging_partials_of_a_kv_split_equals_unsplit_attention(
    backend: str, kv_len: int, q_len: int, parts: int, data: st.DataObject
) -> None:
    # The queries are the last q_len tokens of the sequence (a chunk, or a decode if q_len = 1).
    q_len = min(q_len, kv_len)
    inner = sorted(
        data.draw(st.lists(st.integers(0, kv_len), min_size=parts - 1, max_size=parts - 1))
    )
    cuts = [0, *inner, kv_len]  # empty shards allowed: they must contribute nothing
    gen = torch.Generator().manual_seed(kv_len * 131 + q_len)
    k, v = torch.randn(kv_len, HKV, D, generator=gen), torch.randn(kv_len, HKV, D, generator=gen)
    q = torch.randn(q_len, HQ, D, generator=gen)
    q_start = kv_len - q_len
    outs, lses = _shard_partials(q, k, v, q_start, cuts, backend)
    out, lse = merge_attention_partials(outs, lses)
    ref_out, ref_lse = _dense_reference(
        q, k, v, torch.arange(q_start, kv_len), torch.arange(kv_len)
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_merge_ignores_empty_partials_and_never_makes_nan() -> None:
    out = torch.randn(3, HQ, D)
    lse = torch.randn(3, HQ)
    empty_out, empty_lse = torch.zeros(3, HQ, D), torch.full((3, HQ), -math.inf)
    merged, merged_lse = merge_attention_partials(
        [empty_out, out, empty_out], [empty_lse, lse, empty_lse]
    )
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    none, none_lse = merge_attention_partials([empty_out, empty_out], [empty_lse, empty_lse])
    assert not torch.isnan(none).any() and torch.all(none == 0)
    assert torch.all(torch.isneginf(none_lse))


def test_merge_is_exact_for_far_apart_lses() -> None:
    """Weights exp(lse - max) must not overflow or underflow to garbage for large lses."""
    a, b = torch.randn(2, HQ, D), torch.randn(2, HQ, D)
    merged, lse = merge_attention_partials(
        [a, b], [torch.full((2, HQ), 1000.0), torch.full((2, HQ), 1000.0)]
    )
    torch.testing.assert_close(merged, (a + b) / 2)
    torch.testing.assert_close(lse, torch.full((2, HQ), 1000.0 + math.log(2)))


def test_shard_holding_no_keys_yields_minus_infinity_lse() -> None:
    q = torch.randn(4, HQ, D)
    meta = AttentionMetadata.build(
        q_lens=[4],
        q_start_pos=[10],
        kv_lens=[0],
        block_tables=[[]],
        block_size=BLOCK,
        appends=[False],
    )
    cache = torch.randn(2, BLOCK, HKV, D)
    out, lse = paged_attention(q, cache, cache, meta, SCALE)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_write_kv_skips_tokens_another_shard_stores() -> None:
    cache_k, cache_v = torch.zeros(2, BLOCK, HKV, D), torch.zeros(2, BLOCK, HKV, D)
    k = torch.randn(3, HKV, D)
    write_kv(k, k, cache_k, cache_v, torch.tensor([5, -1, 17]))
    flat = cache_k.view(-1, HKV, D)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[17], k[2])
    assert int((flat.abs().sum(dim=(1, 2)) > 0).sum()) == 2


def test_metadata_rejects_block_tables_too_short_for_the_keys() -> None:
    with pytest.raises(ValueError, match="block table"):
        AttentionMetadata.build(
            q_lens=[1], q_start_pos=[16], kv_lens=[17], block_tables=[[3]], block_size=BLOCK
        )


def test_metadata_keeps_block_tables_ragged_not_padded_to_the_longest() -> None:
    # One sequence at a 1M-token context beside short ones: a table padded to the longest would
    # be 3 x 65,536 ids (and as many Python ints to build every step); ragged it is their sum.
    tables = [list(range(65_536)), [7], [9, 3]]
    meta = AttentionMetadata.build(
        q_lens=[1, 1, 2],
        q_start_pos=[65_536 * BLOCK - 1, 0, 17],
        kv_lens=[65_536 * BLOCK, 1, 19],
        block_tables=tables,
        block_size=BLOCK,
    )
    assert meta.block_ids.numel() == 65_539
    assert meta.block_starts == (0, 65_536, 65_537, 65_539)
    views = seq_views(meta)
    assert [view.block_ids.tolist() for view in views[1:]] == [[7], [9, 3]]
    assert views[0].first_block == 0  # consecutive: read in place


def test_a_chunk_over_its_cached_prefix_builds_no_query_by_key_mask_under_sdpa() -> None:
    # The flash path of a causal tail never reads the [q_len, kv_len] mask (8,192 queries over
    # 262K keys: 2 GiB), so it must not be built; a KVP shard's partial mask still is.
    q, k_cache, v_cache, meta, _ = _paged_case([(40, 24), (0, 30)])
    paged_attention(q, k_cache, v_cache, meta, SCALE, backend="sdpa")
    assert all(view.causal_tail and "visible" not in vars(view) for view in seq_views(meta))
    # Queries at 10..13 over a shard of keys 8..23: neither all visible nor a causal tail.
    shard = AttentionMetadata.build(
        q_lens=[4],
        q_start_pos=[10],
        kv_lens=[16],
        kv_start_pos=[8],
        block_tables=[[0]],
        block_size=BLOCK,
        appends=[False],
    )
    view = seq_views(shard)[0]
    assert not view.causal_tail and view.visible is not None
    assert view.visible.tolist()[0] == [k <= 10 for k in range(8, 24)]
