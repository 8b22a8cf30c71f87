"""Packed projections compute what the nn.Linear layers they pack compute, in every layout and
on any number of threads, while the layers keep their Hugging Face names, shapes and values."""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from medha.model.llama import layer_projections
from medha.model.projections import MAX_SPLIT_ROWS, PackedProjection, pack_in_read_order
from medha.model.weight_arena import HUGE_PAGE, advise_huge_pages, allocate_arena
from tests.hf_models import VARIANTS, hf_arch, hf_model, medha_model


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _linears(in_features: int, outs: list[int], bias: bool, seed: int) -> list[nn.Linear]:
    torch.manual_seed(seed)
    layers = [nn.Linear(in_features, out, bias=bias) for out in outs]
    for layer in layers:
        layer.requires_grad_(False)
    return layers


def _expected(layers: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer(x) for layer in layers], dim=-1)


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.sampled_from([8, 12, 16, 48]),
    outs=st.lists(st.sampled_from([4, 8, 12, 32, 64]), min_size=1, max_size=3),
    bias=st.booleans(),
    rows=st.sampled_from([1, 2, 5, MAX_SPLIT_ROWS, MAX_SPLIT_ROWS + 1, 40]),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 1000),
)
def test_packed_output_equals_the_linears_outputs_side_by_side(
    in_features: int, outs: list[int], bias: bool, rows: int, threads: int, seed: int
) -> None:
    layers = _linears(in_features, outs, bias, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    expected = _expected(layers, x)
    projection = PackedProjection(layers)
    projection.pack()
    assert projection.is_packed
    with torch_threads(threads):
        actual = projection(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("outs", "input_major"), [([64, 32], True), ([8], False)])
def test_packed_weights_are_views_of_one_buffer_with_unchanged_names_and_values(
    outs: list[int], input_major: bool
) -> None:
    layers = _linears(16, outs, bias=True, seed=0)
    before = [(layer.weight.clone(), layer.bias.clone()) for layer in layers]
    projection = PackedProjection(layers)
    projection.pack()
    assert projection.input_major is input_major
    assert projection.weight is not None
    buffer = projection.weight.untyped_storage().data_ptr()
    for layer, (weight, bias), out in zip(layers, before, outs, strict=True):
        assert layer.weight.shape == (out, 16)
        assert layer.weight.untyped_storage().data_ptr() == buffer
        assert torch.equal(layer.weight, weight)
        assert torch.equal(layer.bias, bias)
        assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("rows", [1, 4, MAX_SPLIT_ROWS])
@pytest.mark.parametrize(("outs", "bias"), [([192, 64], False), ([96], True)])
def test_a_few_row_bf16_product_is_one_matmul_rounded_once(
    rows: int, outs: list[int], bias: bool
) -> None:
    """bf16 products are not split over threads: a split would sum partials already rounded to
    bf16, which gives other values (and is slower there: see medha.model.projections)."""
    layers = [layer.to(torch.bfloat16) for layer in _linears(256, outs, bias=bias, seed=rows)]
    projection = PackedProjection(layers)
    projection.pack()
    weight = projection.weight
    assert weight is not None
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch_threads(2):
        if projection.input_major:
            once = (
                torch.mm(x, weight)
                if projection.bias is None
                else torch.addmm(projection.bias, x, weight)
            )
        else:
            once = torch.nn.functional.linear(x, weight, projection.bias)
        assert torch.equal(projection(x), once)


def test_weights_loaded_after_packing_reach_the_packed_matmul() -> None:
    source = _linears(16, [24, 8], bias=True, seed=1)
    target = _linears(16, [24, 8], bias=True, seed=2)
    projection = PackedProjection(target)
    projection.pack(copy=False)
    with torch.no_grad():
        for src, dst in zip(source, target, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    x = torch.randn(3, 16)
    torch.testing.assert_close(projection(x), _expected(source, x), rtol=1e-5, atol=1e-5)


def test_a_projection_whose_weights_were_replaced_uses_the_new_weights() -> None:
    layers = _linears(16, [32], bias=False, seed=3)
    projection = PackedProjection(layers)
    projection.pack()
    layers[0].weight = nn.Parameter(torch.randn(32, 16), requires_grad=False)
    assert not projection.is_packed
    x = torch.randn(2, 16)
    torch.testing.assert_close(projection(x), layers[0](x))


def test_linears_with_different_inputs_or_mixed_biases_are_not_packed_together() -> None:
    with pytest.raises(ValueError, match="share their input"):
        PackedProjection([nn.Linear(8, 4), nn.Linear(16, 4)])
    mixed = PackedProjection([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    with pytest.raises(ValueError, match="a bias or none"):
        mixed.pack()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_model_has_exactly_the_hf_parameters_with_their_values(variant: str) -> None:
    reference = hf_model(variant).state_dict()
    model = medha_model(variant)
    names = dict(model.named_parameters())
    expected = {
        n for n in reference if not (n == "lm_head.weight" and "lm_head.weight" not in names)
    }
    assert set(names) == expected
    for name, param in names.items():
        assert torch.equal(param, reference[name]), name


def test_tied_embedding_reads_rows_of_the_packed_lm_head() -> None:
    model = medha_model("tied-smollm2")
    assert hf_arch("tied-smollm2").tie_word_embeddings
    assert model.model.embed_tokens.weight is model.lm_head.weight
    ids = torch.tensor([0, 5, 383])
    expected = hf_model("tied-smollm2").get_input_embeddings()(ids)
    assert torch.equal(model.model.embed_tokens(ids), expected)


def test_a_models_projections_are_packed_back_to_back_in_the_order_a_step_reads_them() -> None:
    model = medha_model("tied-smollm2")
    order = [*layer_projections(model.model.layers.values()), model.logits]
    assert order[:4] == [
        model.model.layers["0"].self_attn.qkv,
        model.model.layers["0"].self_attn.out,
        model.model.layers["0"].mlp.gate_up,
        model.model.layers["0"].mlp.down,
    ]
    element = order[0].linears[0].weight.element_size()
    for before, after in itertools.pairwise(order):
        assert before.is_packed and after.is_packed
        expected = before.weight.data_ptr() + before.packed_numel * element
        assert after.weight.data_ptr() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_arena_is_writable_and_starts_on_a_huge_page(dtype: torch.dtype) -> None:
    arena = allocate_arena(3_000_001, dtype, "cpu")
    assert arena.shape == (3_000_001,) and arena.dtype == dtype
    arena.fill_(2.0)
    assert float(arena[-1]) == 2.0
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert arena.data_ptr() % HUGE_PAGE == 0


@pytest.mark.parametrize(("first", "last"), [(True, False), (False, True)])
def test_a_pipeline_stage_packs_its_layers_and_head_back_to_back(first: bool, last: bool) -> None:
    from medha.model.loader import load_checkpoint
    from medha.parallel.stage_model import StageModel

    checkpoint = load_checkpoint("tiny-random")
    layers = range(0, 1) if first else range(1, checkpoint.arch.num_layers)
    stage = StageModel.load(checkpoint, layers, first, last, 0, 1, None, torch.float32, "cpu")
    order = layer_projections(stage.model.layers.values()) + ([stage.logits] if last else [])
    element = order[0].linears[0].weight.element_size()
    for before, after in itertools.pairwise(order):
        assert after.weight.data_ptr() == before.weight.data_ptr() + before.packed_numel * element
    assert all(p.is_packed for p in order)


def test_packing_projections_of_different_dtypes_together_is_refused() -> None:
    a = PackedProjection(_linears(8, [4], False, 0))
    b = PackedProjection([nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="share dtype and device"):
        pack_in_read_order([a, b])


def test_a_kernel_refusing_huge_pages_still_gets_its_weights_loaded() -> None:
    class Refusing:
        def madvise(self, option: int) -> None:
            raise OSError(22, "Invalid argument")

    assert advise_huge_pages(Refusing()) is False  # type: ignore[arg-type]
