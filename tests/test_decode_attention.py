"""The decode fast paths give what the general paths give: one-query attention with a single
softmax pass, keys read in place from consecutive blocks, the per-step KV write, and whole
models decoding on several threads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.kernels import AttentionMetadata, paged_attention, write_kv
from medha.kernels.attention import write_step_kv
from medha.kernels.decode import (
    NATIVE_BF16_KEYS,
    attend_one_query_flash,
    attend_one_query_matmul,
)
from medha.kernels.decode_batch import MAX_PADDED_KEYS, decode_buckets
from medha.kernels.layout import gather_kv, new_kv_pool, seq_views
from medha.kernels.reference import attend
from medha.model.runner import StepSeq
from tests.hf_models import hf_greedy, hf_logits, max_relative_error
from tests.runner_support import ShuffledBlocks, blocks_for, greedy_continue, make_runner
from tests.test_packed_projections import torch_threads

BLOCK = 16


@pytest.mark.parametrize("attend_fn", [attend_one_query_flash, attend_one_query_matmul])
@settings(max_examples=30, deadline=None)
@given(
    kv_len=st.integers(1, 300),
    heads=st.sampled_from([(4, 4), (8, 2), (6, 1)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_one_query_attention_equals_the_reference_softmax(
    attend_fn, kv_len: int, heads: tuple[int, int], dtype: torch.dtype, seed: int
) -> None:
    num_heads, kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(1, num_heads, 16, generator=gen)).to(dtype)
    k = (3 * torch.randn(kv_len, kv_heads, 16, generator=gen)).to(dtype)
    v = torch.randn(kv_len, kv_heads, 16, generator=gen).to(dtype)
    out, lse = attend_fn(q, k, v, 0.25)
    ref_out, ref_lse = attend(q, k, v, None, 0.25)
    assert out.shape == ref_out.shape
    assert lse.dtype == torch.float32
    # bf16 inputs: the flash kernel rounds its output to bf16 (the model casts to it anyway).
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)


def _hf_eager_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """HF's eager attention in bf16 for one query: bf16 scores, fp32 softmax rounded to bf16,
    bf16 P.V over K/V repeated per query head."""
    group = q.shape[1] // k.shape[1]
    keys = k.transpose(0, 1).repeat_interleave(group, 0)  # [Hq, kv_len, D]
    values = v.transpose(0, 1).repeat_interleave(group, 0)
    scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) * scale
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (weights @ values).transpose(0, 1)


@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("kv_len", [NATIVE_BF16_KEYS, 3000])
def test_a_long_bf16_decode_multiplies_in_bf16_in_place_as_precisely_as_hf(
    kv_len: int, heads: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From NATIVE_BF16_KEYS keys the products stay in bf16, reading the head-major pool in
    place: as close to the fp32 softmax as HF's eager bf16 attention gets (peaked scores, where
    rounding them costs most), and not the fp32 path's numbers (which it would be, bit for bit,
    if the branch were not taken)."""
    num_heads, kv_heads = heads
    gen = torch.Generator().manual_seed(kv_len + num_heads)
    blocks = -(-kv_len // BLOCK)
    pools = [new_kv_pool(blocks + 2, BLOCK, kv_heads, 64, torch.bfloat16, "cpu") for _ in "kv"]
    for pool in pools:
        pool.copy_(torch.randn(pool.shape, generator=gen))
    (view,) = seq_views(_meta([list(range(1, blocks + 1))], [kv_len]))
    k, v = (gather_kv(pool, view) for pool in pools)
    assert k.data_ptr() == pools[0][1].data_ptr(), "read in place"
    q = (3 * torch.randn(1, num_heads, 64, generator=gen)).to(torch.bfloat16)
    out, lse = attend_one_query_matmul(q, k, v, 0.125)
    ref_out, ref_lse = attend(q.float(), k.float(), v.float(), None, 0.125)
    hf_error = (_hf_eager_bf16(q, k, v, 0.125).float() - ref_out).abs().max()
    # Measured: within 1.15x of HF's error (0.5-2.5% of the largest output).
    assert (out.float() - ref_out).abs().max() <= 1.5 * hf_error + 1e-3
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0.03)  # measured <= 0.015
    monkeypatch.setattr("medha.kernels.decode.NATIVE_BF16_KEYS", 10**9)
    fp32_out, _ = attend_one_query_matmul(q, k, v, 0.125)
    assert not torch.equal(out, fp32_out)


def _meta(tables: list[list[int]], kv_lens: list[int]) -> AttentionMetadata:
    return AttentionMetadata.build(
        q_lens=[1] * len(tables),
        q_start_pos=[n - 1 for n in kv_lens],
        kv_lens=kv_lens,
        block_tables=tables,
        block_size=BLOCK,
    )


@pytest.mark.parametrize("head_major", [True, False])
def test_keys_of_consecutive_blocks_are_read_in_place_and_equal_a_gather(head_major: bool) -> None:
    cache = torch.randn(32, BLOCK, 2, 8)
    if head_major:
        cache = new_kv_pool(32, BLOCK, 2, 8, torch.float32, "cpu").copy_(cache)
    meta = _meta([[5, 6, 7, 8], [9, 3, 4]], [60, 40])
    consecutive, scattered = seq_views(meta)
    assert consecutive.first_block == 5
    assert scattered.first_block is None
    in_place = gather_kv(cache, consecutive)
    assert in_place.data_ptr() == cache[5].data_ptr()
    if head_major:
        # Each kv head's keys are one [tokens, head_dim] matrix, and so is a gather's copy.
        assert in_place.stride()[0] == 8 and gather_kv(cache, scattered).stride()[0] == 8
    assert torch.equal(in_place, cache.index_select(0, consecutive.block_ids).view(-1, 2, 8)[:60])
    assert torch.equal(gather_kv(cache, scattered), cache[[9, 3, 4]].reshape(-1, 2, 8)[:40])


def test_decode_batch_over_consecutive_and_scattered_blocks_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(32, BLOCK, 2, 8, generator=gen)
    v_cache = torch.randn(32, BLOCK, 2, 8, generator=gen)
    q = torch.randn(3, 8, 8, generator=gen)
    meta = _meta([[0, 1, 2], [10, 4], [20]], [35, 17, 1])
    fast = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="sdpa")
    ref = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="reference")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    alone = _meta([[10, 4]], [17])
    single = paged_attention(q[1:2], k_cache, v_cache, alone, 0.3, backend="sdpa")
    torch.testing.assert_close(single[0], ref[0][1:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single[1], ref[1][1:2], rtol=1e-5, atol=1e-5)


def _decode_case(kv_lens: list[int], dtype: torch.dtype, head_major: bool, seed: int = 0):
    """Decodes over scrambled blocks, plus a 9-token prefill chunk among them, as a step mixes
    them. Every cache slot that holds none of their keys (other blocks, and the stale tails of
    their last blocks) is NaN: a read of someone else's KV shows."""
    gen = torch.Generator().manual_seed(seed)
    blocks = ShuffledBlocks(256, seed)
    lens = [*kv_lens[:2], 30, *kv_lens[2:]]  # the prefill chunk is the third sequence
    q_lens = [1, 1, 9] + [1] * (len(kv_lens) - 2)
    tables = [blocks.take(-(-n // BLOCK)) for n in lens]
    caches = []
    for _ in "kv":
        keys = torch.full((256 * BLOCK, 2, 8), float("nan"))
        for table, n in zip(tables, lens, strict=True):
            slots = torch.tensor([table[i // BLOCK] * BLOCK + i % BLOCK for i in range(n)])
            keys[slots] = 3 * torch.randn(n, 2, 8, generator=gen)
        cache = keys.view(256, BLOCK, 2, 8).to(dtype)
        if head_major:
            cache = new_kv_pool(256, BLOCK, 2, 8, dtype, "cpu").copy_(cache)
        caches.append(cache)
    meta = AttentionMetadata.build(
        q_lens=q_lens,
        q_start_pos=[n - q for n, q in zip(lens, q_lens, strict=True)],
        kv_lens=lens,
        block_tables=tables,
        block_size=BLOCK,
    )
    q = (3 * torch.randn(sum(q_lens), 8, 8, generator=gen)).to(dtype)
    return q, *caches, meta


@pytest.mark.parametrize("head_major", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_attended_in_buckets_equal_the_reference(
    dtype: torch.dtype, head_major: bool
) -> None:
    kv_lens = [1, 480, 35, 17, 440, 33, 16, 200, 600]
    q, k_cache, v_cache, meta = _decode_case(kv_lens, dtype, head_major)
    with torch_threads(1):  # one thread: fp32 decodes take the buckets too
        out, lse = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="sdpa")
    # {480, 440, 200} and {35, 33, 17, 16}; the 1-key decode would pad past 1.5x and the
    # 600-key one is over MAX_KEYS: each runs alone.
    buckets = meta.scratch["decode_buckets"]
    assert sorted(len(b.rows) for b in buckets) == [3, 4]
    ref_out, ref_lse = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="reference")
    assert torch.isfinite(ref_out).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)


def test_buckets_keep_to_short_contexts_and_padding_within_the_allowance() -> None:
    """Sorted by context, a bucket grows while size x longest <= 1.5 x its keys and <=
    MAX_PADDED_KEYS; decodes over more than MAX_KEYS keys, or left alone, get none."""
    lens = [500, 20, 20, 20, 450, 5000]
    meta = _meta([list(range(-(-n // BLOCK))) for n in lens], lens)
    buckets = decode_buckets(seq_views(meta), BLOCK)
    assert sorted(sorted(b.rows.tolist()) for b in buckets) == [[0, 4], [1, 2, 3]]
    many = _meta([list(range(-(-300 // BLOCK)))] * 30, [300] * 30)
    sizes = [len(b.rows) for b in decode_buckets(seq_views(many), BLOCK)]
    assert sizes == [MAX_PADDED_KEYS // 300, 30 - MAX_PADDED_KEYS // 300]
    wide = next(b for b in buckets if b.width == 500)
    # Real keys follow the block table; padding repeats the decode's own first key, masked.
    assert wide.slots.tolist()[500 + 449 : 500 + 451] == [449, 0]
    assert wide.bias[1, 0, 449] == 0 and wide.bias[1, 0, 450] == float("-inf")


def test_decodes_of_an_earlier_kvp_shard_are_bucketed_too() -> None:
    """A KVP group holding an earlier range of two sequences: every key visible, nothing
    appended; bucketed, they equal the reference."""
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(2, 16, BLOCK, 2, 8, generator=gen)
    meta = AttentionMetadata.build(
        q_lens=[1, 1],
        q_start_pos=[90, 70],
        kv_lens=[48, 40],
        kv_start_pos=[0, 16],
        block_tables=[[3, 7, 1], [9, 2, 12]],
        block_size=BLOCK,
        appends=[False, False],
    )
    q = torch.randn(2, 8, 8, generator=gen)
    with torch_threads(1):
        fast = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="sdpa")
    assert len(meta.scratch["decode_buckets"]) == 1
    ref = paged_attention(q, k_cache, v_cache, meta, 0.3, backend="reference")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [[5, 17, 40], [5, -1, 17], [-1, -1, -1]])
def test_per_step_kv_write_equals_write_kv(slots: list[int]) -> None:
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    caches = [torch.zeros(4, BLOCK, 2, 4) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], torch.tensor(slots))
    meta = AttentionMetadata.build(
        q_lens=[3], q_start_pos=[0], kv_lens=[3], block_tables=[[0]], block_size=BLOCK
    )
    meta = dataclasses.replace(meta, slot_mapping=torch.tensor(slots))
    write_step_kv(k, v, caches[2], caches[3], meta)
    write_step_kv(k, v, caches[2], caches[3], meta)  # the cached slot choice is reused
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["llama3-gqa", "qwen2-bias", "llama-biases"])
def test_decoding_on_consecutive_blocks_and_any_thread_count_matches_hf(
    variant: str, threads: int
) -> None:
    ids = [(7 * i + 3) % 384 for i in range(40)]
    new_tokens = 12
    runner = make_runner(variant, "sdpa")
    table = list(range(3, 3 + blocks_for(len(ids) + new_tokens)))
    with torch_threads(threads):
        logits = runner.step([StepSeq(ids, 0, table)], all_logits=True)
        assert max_relative_error(logits, hf_logits(variant, ids)) <= 1e-4
        tokens = greedy_continue(runner, int(logits[-1].argmax()), len(ids), table, new_tokens)
    assert tokens == hf_greedy(variant, ids, new_tokens)


@pytest.mark.parametrize("threads", [1, 2])  # decode buckets on one thread, flash on two
def test_batched_decodes_equal_each_decode_alone(threads: int) -> None:
    variant = "llama3-gqa"
    prompts = [[(5 * i + s) % 384 for i in range(20 + 7 * s)] for s in range(3)]
    blocks = ShuffledBlocks(256, seed=3)
    tables = [blocks.take(blocks_for(len(p) + 1)) for p in prompts]
    runner = make_runner(variant, "sdpa")
    for prompt, table in zip(prompts, tables, strict=True):
        runner.step([StepSeq(prompt, 0, table, sample=False)])
    decodes = [StepSeq([7], len(p), t) for p, t in zip(prompts, tables, strict=True)]
    with torch_threads(threads):
        together = runner.step(decodes)
        alone = torch.cat([runner.step([d]) for d in decodes])
    assert max_relative_error(together, alone) <= 1e-4


def test_the_engines_kv_cache_is_head_major() -> None:
    """Decode reads a kv head's keys in place only if the pools keep each head contiguous."""
    runner = make_runner("llama3-gqa", num_blocks=8)
    for pool in (*runner.kv_cache.k, *runner.kv_cache.v):
        assert pool.shape == (8, runner.block_size, runner.arch.num_kv_heads, runner.arch.head_dim)
        assert pool.permute(2, 0, 1, 3).is_contiguous()


@pytest.mark.parametrize(
    ("dtype", "threads", "uses_flash"),
    [(torch.float32, 1, False), (torch.float32, 2, True), (torch.bfloat16, 2, False)],
)
def test_decode_takes_the_flash_kernel_only_where_it_is_faster(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, threads: int, uses_flash: bool
) -> None:
    """fp32 on several threads: flash; one thread, or bf16 (where flash is ~6x slower): the
    matmul form."""
    import medha.kernels.decode as decode

    called = []
    monkeypatch.setattr(
        decode, "attend_one_query_flash", lambda *args: called.append(1) or ("flash", None)
    )
    q, k, v = torch.randn(1, 4, 8).to(dtype), *(torch.randn(5, 2, 8).to(dtype) for _ in "kv")
    with torch_threads(threads):
        decode.attend_one_query(q, k, v, 0.3)
    assert bool(called) is uses_flash
