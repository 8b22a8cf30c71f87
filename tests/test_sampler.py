"""The sampler: greedy is argmax, filters keep exactly what they promise, draws follow the
tempered distribution, and a seeded request's tokens do not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from medha.model.sampler import SampleOutput, _draw_inverse_cdf, make_generator, sample
from medha.sampling import SamplingParams

# Chi-square critical value, 9 degrees of freedom, alpha = 0.001 (scipy.stats.chi2.ppf(0.999, 9)).
CHI2_CRITICAL_DF9 = 27.877

# Ten tokens with clearly distinct probabilities (every expected count in 20k draws is > 100).
LOGITS_10 = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.4, -0.8, -1.0])


def _random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draw_many(
    logits_row: torch.Tensor, params: SamplingParams, draws: int, seed: int
) -> list[int]:
    """`draws` independent samples of one distribution: one batch, one shared seeded generator."""
    generator = make_generator(seed)
    out = sample(logits_row.expand(draws, -1).clone(), [params] * draws, [generator] * draws)
    return out.token_ids


def _chi_square(tokens: list[int], expected_probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_rows_take_the_argmax() -> None:
    logits = _random_logits(6, 40)
    out = sample(logits, [SamplingParams.greedy()] * 6, [None] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_ties_resolve_to_the_lowest_token_id() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0]])
    assert sample(logits, [SamplingParams.greedy()], [None]).token_ids == [1]


def test_greedy_row_consumes_no_randomness() -> None:
    generator = make_generator(11)
    state_before = generator.getstate()
    sample(_random_logits(1, 30), [SamplingParams.greedy()], [generator])
    assert generator.getstate() == state_before


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=1.3, top_p=1e-6),
        # Below fp32's smallest subnormal: the threshold rounds to 0, and the top token must
        # still be kept (it once masked every token and drew id == vocab size).
        SamplingParams(temperature=1.3, top_p=1e-50),
        SamplingParams(temperature=1.3, top_p=1e-50, top_k=3),
        SamplingParams(temperature=1.3, min_p=1.0),
    ],
    ids=["top_k=1", "tiny top_p", "top_p under fp32", "top_p under fp32 with top_k", "min_p=1"],
)
def test_filters_that_keep_only_the_top_token_equal_greedy(params: SamplingParams) -> None:
    logits = _random_logits(8, 64, seed=3)
    generators = [make_generator(seed) for seed in range(8)]
    for _ in range(5):
        assert sample(logits, [params] * 8, generators).token_ids == logits.argmax(-1).tolist()


def test_draws_follow_softmax_of_logits_over_temperature() -> None:
    temperature = 0.7
    tokens = _draw_many(LOGITS_10, SamplingParams(temperature=temperature), 20_000, seed=1234)
    assert _chi_square(tokens, (LOGITS_10 / temperature).softmax(-1)) < CHI2_CRITICAL_DF9


def test_distribution_check_detects_a_wrong_temperature() -> None:
    # The check above has power: the same draws are far from the untempered distribution.
    tokens = _draw_many(LOGITS_10, SamplingParams(temperature=0.7), 20_000, seed=1234)
    assert _chi_square(tokens, LOGITS_10.softmax(-1)) > 10 * CHI2_CRITICAL_DF9


def test_draws_with_top_k_follow_the_renormalised_top_k() -> None:
    tokens = _draw_many(LOGITS_10, SamplingParams(temperature=1.0, top_k=4), 8_000, seed=5)
    assert set(tokens) == {0, 1, 2, 3}
    expected = LOGITS_10[:4].softmax(-1)
    # 3 degrees of freedom, alpha = 0.001.
    assert _chi_square(tokens, expected) < 16.27


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = LOGITS_10.softmax(-1)
    cumulative = probs.cumsum(-1)  # LOGITS_10 is sorted, so this is the nucleus order
    top_p = float(cumulative[2]) + 1e-4  # needs four tokens: three are just short of it
    tokens = _draw_many(LOGITS_10, SamplingParams(top_p=top_p), 8_000, seed=6)
    assert set(tokens) == {0, 1, 2, 3}


def test_top_p_equal_to_a_cumulative_mass_stops_there() -> None:
    logits = torch.tensor([0.25, 0.25, 0.25, 0.25]).log()
    tokens = _draw_many(logits, SamplingParams(top_p=0.5), 2_000, seed=7)
    assert set(tokens) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability() -> None:
    probs = LOGITS_10.softmax(-1)
    min_p = 0.3
    allowed = {i for i, p in enumerate(probs.tolist()) if p >= min_p * float(probs.max())}
    tokens = _draw_many(LOGITS_10, SamplingParams(min_p=min_p), 8_000, seed=8)
    assert set(tokens) == allowed
    assert len(allowed) < 10


def test_filtered_tokens_are_never_drawn_under_combined_filters() -> None:
    logits = _random_logits(1, 200, seed=9)[0]
    params = SamplingParams(temperature=2.0, top_k=20, top_p=0.8, min_p=0.05)
    # vLLM V1's order: min-p against the top token, then top-k, then top-p over what is left.
    scaled = logits / 2.0
    scaled = scaled.masked_fill(scaled - scaled.max() < torch.tensor(0.05).log(), float("-inf"))
    top20 = scaled.topk(20).indices
    probs = scaled[top20].softmax(-1)
    allowed = {int(t) for t in top20[(probs.cumsum(-1) - probs) < 0.8]}
    tokens = _draw_many(logits, params, 5_000, seed=10)
    assert set(tokens) <= allowed
    assert len(set(tokens)) > 1


def test_min_p_applies_before_top_p_as_in_vllm_v1() -> None:
    # min-p 0.3 leaves tokens 0 and 1 (0.5 and 0.2 >= 0.15), renormalised to 0.714 and 0.286;
    # top-p 0.7 then keeps token 0 alone. With min-p last (vLLM V0, HF), top-p 0.7 keeps tokens
    # 0 and 1 of the full distribution, and token 1 is drawn about 2 times in 7.
    logits = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]).log()
    tokens = _draw_many(logits, SamplingParams(top_p=0.7, min_p=0.3), 2_000, seed=17)
    assert set(tokens) == {0}


@pytest.mark.parametrize("temperature", [0.5, 1e-3])
def test_a_logit_at_the_largest_float_under_a_low_temperature_is_drawn_not_nan(
    temperature: float,
) -> None:
    # A repetition penalty of 1e-38 leaves a positive logit at the largest float; dividing by a
    # temperature below 1 overflowed it to +inf, the softmax to NaN, and the draw to token id
    # `vocab`, which failed the engine.
    logits = _random_logits(3, 50, seed=18)
    logits[:, 7] = torch.finfo(torch.float32).max
    logits[1, 9] = torch.finfo(torch.float32).max  # two tokens at the top: either may come
    logits[2, 3] = float("-inf")  # a masked token stays masked
    params = [SamplingParams(temperature=temperature, min_p=0.1, top_p=0.9)] * 3
    for seed in range(20):
        out = sample(logits, params, [make_generator(seed)] * 3)
        assert out.token_ids[0] == 7
        assert out.token_ids[1] in {7, 9}
        assert out.token_ids[2] == 7


def test_overflowed_logits_keep_their_order_and_masked_tokens_stay_masked() -> None:
    most = torch.finfo(torch.float32).max
    inf = float("inf")
    logits = torch.tensor(
        [
            [3e38, 2e38, 0.0, 1.0],  # / 0.5: both +inf, yet 3e38 leads by 2e38 (x 2)
            [-inf, -inf, -most, -inf],  # / 0.5: -inf, yet the one token left is certain
            [-inf, -most, -inf, -most],  # two left, equally likely
        ]
    )
    params = [SamplingParams(temperature=0.5)] * 3
    seen = [set(), set(), set()]
    for seed in range(40):
        for row, token in enumerate(sample(logits, params, [make_generator(seed)] * 3).token_ids):
            seen[row].add(token)
    assert seen == [{0}, {2}, {1, 3}]


def test_a_row_without_a_distribution_takes_its_most_likely_token() -> None:
    # The model's own NaN or +inf logits leave nothing to draw from: the most likely token
    # (NaN the least likely; greedy's argmax, which skips no pass for this, counts NaN as
    # the largest), never an id past the vocabulary.
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, nan, 5.0, 2.0], [0.0, 1.0, inf, 2.0], [nan, nan, 1.0, nan]])
    params = [SamplingParams(temperature=0.8)] * 3
    assert sample(logits, params, [make_generator(1)] * 3).token_ids == [2, 2, 2]
    probs = torch.tensor([[0.2, nan, 0.3], [0.0, 0.0, 0.0], [0.1, 0.6, 0.3]])
    assert _draw_inverse_cdf(probs, torch.full((3,), 0.5)).tolist() == [-1, -1, 1]


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0]).log_softmax(-1)
    tokens = _draw_many(logits, SamplingParams(top_k=2), 4_000, seed=11)
    assert set(tokens) == {0, 1, 2, 3}


def test_top_k_row_samples_the_same_whether_or_not_its_batch_uses_top_p() -> None:
    # Batches with a top-p row take the sorting path, others a cheaper top-k path; a row's
    # tokens must not depend on that, ties at the k-th value included.
    logits = _random_logits(2, 80, seed=16)
    logits[0, :6] = 20.0
    top_k_row = SamplingParams(temperature=1.0, top_k=3)

    def tokens_next_to(neighbour: SamplingParams) -> list[int]:
        generator = make_generator(3)
        params, generators = [top_k_row, neighbour], [generator, None]
        return [sample(logits, params, generators).token_ids[0] for _ in range(40)]

    without_top_p = tokens_next_to(SamplingParams(temperature=1.0))
    assert without_top_p == tokens_next_to(SamplingParams(temperature=1.0, top_p=0.5))
    assert set(without_top_p) == set(range(6))


def test_a_uniform_at_the_top_of_the_range_never_lands_on_a_filtered_tail_token() -> None:
    # u * total may round up to total; the draw must still be a token with mass.
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert _draw_inverse_cdf(probs, torch.ones(2)).tolist() == [1, 0]
    assert _draw_inverse_cdf(probs, torch.zeros(2)).tolist() == [0, 0]


def test_top_k_larger_than_vocabulary_keeps_everything() -> None:
    tokens = _draw_many(LOGITS_10, SamplingParams(top_k=1000), 20_000, seed=12)
    assert _chi_square(tokens, LOGITS_10.softmax(-1)) < CHI2_CRITICAL_DF9


def test_a_seeded_request_gets_the_same_tokens_alone_and_at_row_3_of_5() -> None:
    vocab = 50
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    alone = make_generator(params.seed)
    in_batch = make_generator(params.seed)
    neighbours = [
        (SamplingParams(temperature=1.5), make_generator(1)),
        (SamplingParams.greedy(), None),
        (SamplingParams(temperature=0.5, top_k=5), None),
        (SamplingParams(temperature=1.0, min_p=0.1), make_generator(2)),
    ]
    alone_tokens, batch_tokens = [], []
    for step in range(12):
        logits = _random_logits(5, vocab, seed=100 + step)
        alone_tokens += sample(logits[3:4], [params], [alone]).token_ids
        rows = [*neighbours[:3], (params, in_batch), *neighbours[3:]]
        out = sample(logits, [p for p, _ in rows], [g for _, g in rows])
        batch_tokens.append(out.token_ids[3])
    assert alone_tokens == batch_tokens
    assert len(set(alone_tokens)) > 1  # really random draws, not a degenerate distribution


def test_same_seed_reproduces_and_other_seed_differs() -> None:
    logits = _random_logits(1, 1000, seed=13)
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [sample(logits, [params], [generator]).token_ids[0] for _ in range(20)]

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("other", [5 + 2**32, 5 + 2**40, 5 + 2**63])
def test_every_bit_of_a_seed_counts(other: int) -> None:
    # torch's CPU generator keeps only a seed's low 32 bits: `user << 32 | i` seeds collided.
    logits = _random_logits(1, 1000, seed=13)
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [sample(logits, [params], [generator]).token_ids[0] for _ in range(20)]

    assert run(5) != run(other)


def test_unseeded_generators_get_fresh_seeds() -> None:
    assert make_generator(None).random() != make_generator(None).random()


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = _random_logits(4, 30, seed=14)
    params = [
        SamplingParams.greedy(logprobs=0),
        SamplingParams(temperature=0.5, top_k=3, logprobs=0),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    generators = [make_generator(i) for i in range(4)]
    out = sample(logits, params, generators)
    reference = logits.log_softmax(-1)
    for row in (0, 1, 3):
        logprob = out.logprobs[row]
        assert logprob is not None
        assert logprob == pytest.approx(float(reference[row, out.token_ids[row]]), abs=1e-5)
    assert out.logprobs[2] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_sample_like_their_fp32_values(dtype: torch.dtype) -> None:
    logits = _random_logits(3, 100, seed=15).to(dtype)
    params = [SamplingParams.greedy(logprobs=2), SamplingParams(top_k=10, logprobs=0)] * 2
    params = params[:3]

    def run(x: torch.Tensor) -> SampleOutput:
        return sample(x, params, [make_generator(i) for i in range(3)])

    half, full = run(logits), run(logits.float())
    assert half == full


def test_empty_batch_returns_empty_output() -> None:
    assert sample(torch.empty(0, 10), [], []) == SampleOutput(token_ids=[], logprobs=[])


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 logits rows"):
        sample(torch.zeros(2, 5), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.zeros(5), [SamplingParams()], [None])
