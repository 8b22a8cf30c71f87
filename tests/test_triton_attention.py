"""The Triton kernels compute the reference attention (output and lse) on every batch shape the
engine produces, write every output element, and merge partials exactly.

Without a GPU the kernels run in Triton's CPU interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton. With a GPU the same tests run the compiled
kernels on it.
"""

from __future__ import annotations

import math

import pytest
import torch

from medha.config import EngineConfig
from medha.engine_setup import build_engine_parts
from medha.kernels import (
    AttentionMetadata,
    merge_attention_partials,
    paged_attention,
    select_backend,
    triton_attention,
    triton_backend,
    write_kv,
)
from medha.kernels.layout import new_kv_pool
from medha.model.runner import StepSeq
from medha.model.setup import build_runner
from tests.runner_support import ShuffledBlocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_backend.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)
triton_prefill = pytest.importorskip("medha.kernels.triton_prefill")
merge_partials = pytest.importorskip("medha.kernels.triton_merge").merge_partials

BLOCK = 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the finite entries, which must coincide."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "non-finite entries differ"
    assert torch.equal(actual[~finite], expected[~finite]), "-inf entries differ"
    return float((actual[finite] - expected[finite]).norm() / expected[finite].norm())


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs and split partials start as NaN: an element a kernel forgets to write fails."""
    new_outputs, new_partials = triton_backend.new_outputs, triton_prefill.new_partials

    def poison(tensors: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[0].fill_(math.nan), tensors[1].fill_(math.nan)

    monkeypatch.setattr(triton_backend, "new_outputs", lambda q: poison(new_outputs(q)))
    monkeypatch.setattr(triton_prefill, "new_partials", lambda *args: poison(new_partials(*args)))


def make_batch(
    seqs: list[tuple[int, int]],
    *,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    kv_start: list[int] | None = None,
    q_start: list[int] | None = None,
    appends: list[bool] | None = None,
    seed: int = 0,
    head_major: bool = False,
    surplus: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A ragged batch of sequences given as (keys in the shard before the step, query tokens)
    over a randomly filled paged cache with scrambled block tables. By default each sequence's
    queries append to its shard; `appends` False with `q_start` place them elsewhere (KVP).
    `surplus[i]` more blocks end sequence i's table, holding NaN keys and values: blocks
    reserved for its later tokens, which nothing may read."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, kv_heads = heads
    kv_start = kv_start or [0] * len(seqs)
    appends = appends or [True] * len(seqs)
    q_start = q_start or [s + c for s, (c, _) in zip(kv_start, seqs, strict=True)]
    kv_lens = [c + q if a else c for (c, q), a in zip(seqs, appends, strict=True)]
    surplus = surplus or [0] * len(seqs)
    num_blocks = sum(-(-n // BLOCK) for n in kv_lens) + sum(surplus) + 3
    blocks = ShuffledBlocks(num_blocks, seed)
    tables = [
        blocks.take(-(-n // BLOCK)) + blocks.take(extra)
        for n, extra in zip(kv_lens, surplus, strict=True)
    ]
    meta = AttentionMetadata.build(
        q_lens=[q for _, q in seqs],
        q_start_pos=q_start,
        kv_lens=kv_lens,
        kv_start_pos=kv_start,
        block_tables=tables,
        block_size=BLOCK,
        appends=appends,
        device=DEVICE,
    )
    # Random everywhere (never zeros), so keys read from a wrong slot change the result.
    shape = (num_blocks, BLOCK, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in "kv")
    for n, table in zip(kv_lens, tables, strict=True):
        for block in table[-(-n // BLOCK) :]:
            k_cache[block], v_cache[block] = math.nan, math.nan
    if head_major:  # KVCache's memory order: the kernels must index through the strides
        k_cache, v_cache = (
            new_kv_pool(*shape, dtype, DEVICE).copy_(cache) for cache in (k_cache, v_cache)
        )
    new_k, new_v = (torch.randn(meta.num_tokens, kv_heads, head_dim, generator=gen) for _ in "kv")
    write_kv(new_k.to(DEVICE, dtype), new_v.to(DEVICE, dtype), k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, meta


def assert_matches_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    **splits: int,
) -> None:
    scale = q.shape[-1] ** -0.5
    out, lse = triton_attention(q, k_cache, v_cache, meta, scale, **splits)
    ref_out, ref_lse = paged_attention(q, k_cache, v_cache, meta, scale, backend="reference")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any(), "an element was never written"
    tol = TOLERANCE[q.dtype]
    assert rel_error(out, ref_out) <= tol
    assert rel_error(lse, ref_lse) <= tol


# (cached keys, query tokens): chunks with and without a prefix, decodes, KV lengths that are
# not multiples of the block size, one exactly a block.
MIXED = [(0, 21), (19, 1), (33, 12), (0, 1), (16, 16), (70, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_major", [False, True])
def test_mixed_batch_of_chunks_and_decodes_matches_reference(
    dtype: torch.dtype, head_major: bool
) -> None:
    assert_matches_reference(*make_batch(MIXED, dtype=dtype, head_major=head_major))


def test_keys_split_across_programs_merge_to_the_unsplit_result() -> None:
    # Three KV splits for the chunks and three decode partitions: short sequences get empty
    # splits, whose -inf partials must drop out of the merge.
    assert_matches_reference(*make_batch(MIXED, seed=1), prefill_splits=3, decode_partitions=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_decoding_over_several_partitions(dtype: torch.dtype) -> None:
    decodes = [(150, 1), (37, 1), (0, 1), (64, 1)]
    batch = make_batch(decodes, heads=(8, 2), dtype=dtype, seed=2)
    assert_matches_reference(*batch, decode_partitions=4)


@pytest.mark.parametrize("splits", [1, 3])
def test_block_tables_longer_than_their_keys_are_read_only_as_far_as_the_keys(
    splits: int,
) -> None:
    # The metadata keeps tables ragged (one flat run of ids, an offset per sequence): each
    # sequence must start at its own offset even where the tables before it hold more blocks
    # than their keys fill (a request's blocks reserved up front), in shards before, around
    # and after the queries, and with no blocks at all.
    q, k_cache, v_cache, meta = make_batch(
        [*MIXED, (40, 1), (32, 5), (0, 2)],
        kv_start=[0] * len(MIXED) + [100, 32, 500],
        q_start=[c for c, _ in MIXED] + [140, 10, 300],
        appends=[True] * len(MIXED) + [True, False, False],
        surplus=[2, 3, 0, 5, 1, 4, 2, 3, 0],
        seed=6,
    )
    assert_matches_reference(q, k_cache, v_cache, meta, prefill_splits=splits)
    scale = q.shape[-1] ** -0.5
    sdpa_out, _ = paged_attention(q, k_cache, v_cache, meta, scale, backend="sdpa")
    ref_out, _ = paged_attention(q, k_cache, v_cache, meta, scale, backend="reference")
    assert rel_error(sdpa_out, ref_out) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    ("heads", "head_dim"), [((8, 2), 64), ((4, 1), 128), ((6, 2), 32), ((4, 2), 24)]
)
def test_gqa_groups_and_head_dims(heads: tuple[int, int], head_dim: int) -> None:
    batch = make_batch([(9, 7), (30, 1)], heads=heads, head_dim=head_dim, seed=3)
    assert_matches_reference(*batch)


def test_kvp_shards_before_containing_and_after_the_queries() -> None:
    # Shard 0 holds keys wholly before its queries (non-causal); shard 1 is the last group and
    # appends (causal tail); shard 3 starts after its queries: nothing visible, out 0, lse -inf.
    q, k_cache, v_cache, meta = make_batch(
        [(40, 5), (20, 6), (25, 1), (18, 3)],
        kv_start=[64, 100, 32, 500],
        q_start=[150, 120, 90, 200],
        appends=[False, True, False, False],
        seed=4,
    )
    assert_matches_reference(q, k_cache, v_cache, meta, prefill_splits=2)
    out, lse = triton_attention(q, k_cache, v_cache, meta, 0.25)
    assert torch.all(out[-3:] == 0) and torch.all(torch.isneginf(lse[-3:]))


def test_merge_kernel_equals_torch_merge_with_empty_and_far_apart_partials() -> None:
    gen = torch.Generator().manual_seed(5)
    outs = [torch.randn(3, 5, 4, 16, generator=gen) for _ in range(4)]
    lses = [torch.randn(3, 5, 4, generator=gen) * 30 for _ in range(4)]
    lses[1][0] = -math.inf  # one partial empty for some rows
    for lse in lses:
        lse[2, 1] = -math.inf  # every partial empty for one (row, head)
    lses[3][1] += 1000.0  # far apart: exp must not overflow
    outs = [o.to(DEVICE) for o in outs]
    lses = [x.to(DEVICE) for x in lses]
    out, lse = merge_partials(outs, lses)
    ref_out, ref_lse = merge_attention_partials(outs, lses)
    assert not out.isnan().any() and torch.all(out[2, 1] == 0)
    assert rel_error(out, ref_out) <= 1e-5 and rel_error(lse, ref_lse) <= 1e-5
    bf_out, _ = merge_partials([o.bfloat16() for o in outs], lses)
    assert bf_out.dtype == torch.bfloat16 and rel_error(bf_out, ref_out) <= 1e-2


def test_model_steps_through_triton_match_sdpa() -> None:
    """The tiny model prefilled in two chunks and then decoding, next to a second sequence."""
    logits = {}
    for backend in ("sdpa", "triton"):
        runner, _ = build_runner(
            "tiny-random", num_blocks=16, device=DEVICE, attention_backend=backend
        )
        a, b = list(range(1, 30)), list(range(100, 111))
        first = runner.step([StepSeq(a[:13], 0, [3, 1], sample=False)], all_logits=True)
        second = runner.step([StepSeq(a[13:], 13, [3, 1]), StepSeq(b, 0, [7])])
        third = runner.step([StepSeq([5], 29, [3, 1]), StepSeq([6], 11, [7])])
        logits[backend] = torch.cat([first, second, third])
    assert rel_error(logits["triton"], logits["sdpa"]) <= 1e-5


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU selection rules")
def test_auto_selection_picks_triton_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("cpu")[0] != "triton"  # even with TRITON_INTERPRET set
    assert select_backend("cpu", "triton")[0] == "triton"  # named: the interpreter
    assert select_backend(torch.device("cuda"))[0] == "triton"
    monkeypatch.setattr(triton_backend, "triton_installed", lambda: False)
    assert select_backend(torch.device("cuda"))[0] == "sdpa"


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU selection rules")
def test_asking_for_triton_on_cpu_without_the_interpreter_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    config = EngineConfig(model="tiny-random", attention_backend="triton", num_blocks=16)
    with pytest.raises(ValueError, match=r"'triton' is not available on cpu: .*CUDA device"):
        build_engine_parts(config)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("block_size", "blocks hold 8 tokens, the metadata's 16"),
        ("heads", "does not fit"),
        ("head_dim", "does not fit"),
        ("rows", "does not fit"),
    ],
)
def test_shapes_the_kernels_would_read_out_of_bounds_with_are_refused(
    change: str, problem: str
) -> None:
    q, k_cache, v_cache, meta = make_batch([(19, 5), (0, 3)])
    if change == "block_size":  # the same memory seen as blocks of 8: the kernel read past
        k_cache, v_cache = (c.reshape(-1, 8, *c.shape[2:]) for c in (k_cache, v_cache))
    elif change == "heads":
        q = torch.cat([q, q[:, :1]], dim=1)  # 5 query heads over 2 kv heads
    elif change == "head_dim":
        q = q[..., :8].contiguous()
    else:
        q = q[:-1]
    with pytest.raises(ValueError, match=problem):
        triton_attention(q, k_cache, v_cache, meta, 0.25)
