"""Penalties, min_tokens and top logprobs in the sampler: HF's repetition penalty, OpenAI's
presence and frequency penalties, vLLM's min_tokens, each checked against an independent dense
reference; the token history counts by position, so a recomputed prompt is not counted twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from medha.model.logits_processing import TokenHistory, adjust_logits, adjusts_now
from medha.model.request_sampling import RequestSampling, sample_requests
from medha.model.sampler import make_generator, sample
from medha.sampling import SamplingParams, SamplingSetup

VOCAB = 50


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _history(prompt: list[int], output: list[int], stop_ids: tuple[int, ...] = ()) -> TokenHistory:
    history = TokenHistory(len(prompt), stop_ids)
    history.observe(0, prompt + output)
    return history


def test_history_splits_prompt_from_output_and_skips_recomputed_positions() -> None:
    history = TokenHistory(prompt_len=5)
    history.observe(0, [1, 2, 3])
    history.observe(3, [3, 4, 7, 7])  # the prompt's end and two outputs, in one chunk
    assert history.num_generated == 2
    assert history.output_ids().tolist() == [7, 7]
    assert history.prompt_ids(torch.device("cpu")).tolist() == [1, 2, 3, 4]
    # Preempted: the prompt and outputs are recomputed, then decoding goes on.
    history.observe(0, [1, 2, 3, 3, 4, 7, 7])
    history.observe(7, [9])
    assert history.output_ids().tolist() == [7, 7, 9]
    assert history.num_generated == 3
    with pytest.raises(ValueError, match="position 10"):
        history.observe(10, [1])


def test_repetition_penalty_matches_hf_over_prompt_and_output() -> None:
    logits = _logits(3, seed=1)
    prompts = [[1, 2, 3, 2], [10, 11], [40]]
    outputs = [[4, 4], [], [1, 2, 3, 40]]
    penalties = [1.3, 2.0, 0.7]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    ours = adjust_logits(
        logits.clone(), params, [_history(p, o) for p, o in zip(prompts, outputs, strict=True)]
    )
    for row, (prompt, output, penalty) in enumerate(zip(prompts, outputs, penalties, strict=True)):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([prompt + output]), logits[row : row + 1].clone()
        )
        torch.testing.assert_close(ours[row], hf[0])


def test_presence_and_frequency_penalties_count_the_output_only() -> None:
    logits = _logits(2, seed=2)
    prompt, output = [5, 6, 7], [7, 8, 8, 8]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
    ]
    ours = adjust_logits(logits.clone(), params, [_history(prompt, output)] * 2)
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    for row, p in enumerate(params):
        expected = (
            logits[row] - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        )
        torch.testing.assert_close(ours[row], expected)
    assert ours[0, 5] == logits[0, 5]  # in the prompt only: untouched


def test_min_tokens_bans_eos_and_stop_tokens_until_enough_are_generated() -> None:
    logits = _logits(3, seed=3)
    setup = SamplingSetup(SamplingParams(min_tokens=3, stop_token_ids=[9]), 2, (4, VOCAB + 5))
    assert setup.min_tokens_stop_ids == (4, 9, VOCAB + 5)
    # vLLM bans eos before min_tokens even with ignore_eos.
    ignore = SamplingSetup(SamplingParams(min_tokens=1, ignore_eos=True), 2, (4,))
    assert ignore.min_tokens_stop_ids == (4,)
    histories = [
        _history([1, 2], [3, 3], setup.min_tokens_stop_ids),  # 2 generated: banned
        _history([1, 2], [3, 3, 3], setup.min_tokens_stop_ids),  # 3: free again
        _history([1, 2], [], (9,)),
    ]
    params = [setup.params, setup.params, SamplingParams(min_tokens=1)]
    ours = adjust_logits(logits.clone(), params, histories)
    assert ours[0, 4] == ours[0, 9] == float("-inf")
    torch.testing.assert_close(ours[1], logits[1])
    assert ours[2, 9] == float("-inf") and ours[2, 4] == logits[2, 4]
    others = [t for t in range(VOCAB) if t not in (4, 9)]
    torch.testing.assert_close(ours[0, others], logits[0, others])


def test_allowed_tokens_that_are_all_stop_tokens_win_over_min_tokens() -> None:
    # Nothing would be left to sample: the row keeps its allowed tokens instead of a NaN draw.
    logits = _logits(1, seed=9)
    params = SamplingParams(min_tokens=2, allowed_token_ids=[4])
    history = _history([1], [], (4,))
    out = sample(logits, [params], [make_generator(0)], [history])
    assert out.token_ids == [4]


@pytest.mark.parametrize("penalty", [1e-39, 1e-30, 1e30, 1e38])
def test_an_extreme_repetition_penalty_keeps_the_logits_finite(penalty: float) -> None:
    logits = _logits(2, seed=10)
    logits[1, 20:] = float("-inf")  # masked tokens stay masked
    params = [SamplingParams(repetition_penalty=penalty, seed=1)] * 2
    histories = [_history(list(range(VOCAB)), [])] * 2
    ours = adjust_logits(logits.clone(), params, histories)
    assert ours[0].isfinite().all() and ours[1, :20].isfinite().all()
    assert (ours[1, 20:] == float("-inf")).all()
    out = sample(logits, params, [make_generator(i) for i in range(2)], histories)
    assert all(0 <= token < VOCAB for token in out.token_ids) and out.token_ids[1] < 20


def test_a_min_tokens_row_is_left_alone_once_it_has_generated_enough() -> None:
    logits = _logits(1, seed=11)
    history = _history([1], [2, 2, 2], (4,))
    assert not adjusts_now(SamplingParams(min_tokens=3), history)
    assert adjusts_now(SamplingParams(min_tokens=4), history)
    assert adjusts_now(SamplingParams(repetition_penalty=1.1), history)
    out = sample(logits, [SamplingParams.greedy(min_tokens=3)], [None], [history])
    assert out.token_ids == [int(logits.argmax())]


def test_a_greedy_row_takes_the_argmax_of_its_penalised_logits_and_others_are_untouched() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 2.0  # the raw argmax, and it is in the prompt
    logits[:, 8] = 1.5
    prompt = [7, 7, 1]
    penalised = RequestSampling(SamplingSetup(SamplingParams.greedy(repetition_penalty=2.0), 3))
    penalised.observe(0, prompt)
    plain = RequestSampling(SamplingSetup(SamplingParams.greedy(logprobs=0), 3))
    sampled_with = RequestSampling(
        SamplingSetup(SamplingParams(repetition_penalty=2.0, top_k=1, seed=1, logprobs=0), 3)
    )
    sampled_with.observe(0, prompt)
    out = sample_requests(logits, [penalised, plain, sampled_with])
    assert out.token_ids == [8, 7, 8]
    # Logprobs stay the model's raw belief, penalties or not.
    raw = logits[2].log_softmax(-1)
    assert out.logprobs[2] == pytest.approx(float(raw[8]))
    assert out.logprobs[1] == pytest.approx(float(raw[7]))


def test_a_row_with_penalties_but_no_history_is_refused() -> None:
    with pytest.raises(ValueError, match="token history"):
        sample(_logits(1, 4), [SamplingParams(presence_penalty=1.0)], [make_generator(0)])


def test_random_draws_follow_the_penalised_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    history = _history([0], [1, 1])
    params = SamplingParams(frequency_penalty=0.5, repetition_penalty=1.5)
    expected = adjust_logits(logits.clone(), [params], [history]).softmax(-1)[0]
    generator = make_generator(5)
    draws = 20_000
    out = sample(
        logits.expand(draws, -1).clone(), [params] * draws, [generator] * draws, [history] * draws
    )
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).double()
    chi_square = float(((counts - expected * draws) ** 2 / (expected * draws)).sum())
    assert chi_square < 16.27  # chi2.ppf(0.999, 3)
    unpenalised = logits.softmax(-1)[0].double()
    assert float(((counts - unpenalised * draws) ** 2 / (unpenalised * draws)).sum()) > 100


def test_top_logprobs_are_the_most_likely_raw_tokens_most_likely_first() -> None:
    logits = _logits(4, seed=6)
    params = [
        SamplingParams.greedy(logprobs=3),
        SamplingParams(logprobs=0, seed=1),
        SamplingParams(temperature=0.3),
        SamplingParams(logprobs=20, top_k=2, presence_penalty=2.0),
    ]
    histories = [None, None, None, _history([1], [2])]
    generators = [None, make_generator(1), make_generator(2), make_generator(3)]
    out = sample(logits, params, generators, histories)
    reference = logits.log_softmax(-1)
    for row, count in ((0, 3), (3, 20)):
        top = out.top_logprobs[row]
        assert top is not None and len(top) == count
        values, ids = reference[row].topk(count)
        assert [t.token_id for t in top] == ids.tolist()
        assert [t.logprob for t in top] == pytest.approx(values.tolist())
    assert out.top_logprobs[1] == () and out.logprobs[1] is not None
    assert out.top_logprobs[2] is None and out.logprobs[2] is None
    assert out.top_logprobs[0][0].token_id == out.token_ids[0]  # greedy, no penalty


def test_allowed_tokens_and_logit_bias_apply_per_row_before_the_penalties() -> None:
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(allowed_token_ids=[3, 4, 30], logit_bias={4: 2.5}),
        SamplingParams(logit_bias={0: -1.0, 49: 100.0}, repetition_penalty=2.0),
        SamplingParams(),
    ]
    ours = adjust_logits(logits.clone(), params, [None, _history([0, 49], []), None])
    expected0 = torch.full((VOCAB,), float("-inf"))
    expected0[[3, 4, 30]] = logits[0, [3, 4, 30]]
    expected0[4] += 2.5
    torch.testing.assert_close(ours[0], expected0)
    # Biased first, then penalised (vLLM's order): 49's logit is 100-ish, halved.
    expected1 = logits[1].clone()
    expected1[0] -= 1.0
    expected1[49] += 100.0
    expected1[[0, 49]] = torch.where(
        expected1[[0, 49]] > 0, expected1[[0, 49]] / 2.0, expected1[[0, 49]] * 2.0
    )
    torch.testing.assert_close(ours[1], expected1)
    torch.testing.assert_close(ours[2], logits[2])


def test_sampling_never_leaves_the_allowed_tokens() -> None:
    logits = _logits(1, seed=8).expand(2000, -1).clone()
    params = SamplingParams(allowed_token_ids=[5, 17, 33], seed=1)
    out = sample(logits, [params] * 2000, [make_generator(1)] * 2000)
    assert set(out.token_ids) == {5, 17, 33}
    greedy = sample(logits[:1], [SamplingParams.greedy(allowed_token_ids=[5, 17, 33])], [None])
    assert greedy.token_ids == [max((5, 17, 33), key=lambda t: float(logits[0, t]))]


def test_a_bad_words_last_token_is_banned_after_the_output_spells_the_rest() -> None:
    # Bad words (7), (3, 4, 5) and (4, 8): 7 is never sampled; 5 only right after the output's
    # 3, 4, and 8 after its 4, which the prompt's 3, 4 do not count for (vLLM matches the
    # output only).
    words = ((7,), (3, 4, 5), (4, 8))
    params = SamplingParams(bad_words=["seven", "three four five"])
    histories = []
    for prompt, output in (([3, 4], []), ([1], [3, 4]), ([1], [3, 4, 6]), ([1], [2, 3, 4])):
        history = TokenHistory(len(prompt), (), words)
        history.observe(0, prompt + output)
        histories.append(history)
    assert all(adjusts_now(params, history) for history in histories)
    logits = _logits(4, seed=11)
    ours = adjust_logits(logits.clone(), [params] * 4, histories)
    banned = [{7}, {7, 5, 8}, {7}, {7, 5, 8}]
    for row, tokens in enumerate(banned):
        assert {t for t in range(VOCAB) if ours[row, t] == float("-inf")} == tokens
        kept = [t for t in range(VOCAB) if t not in tokens]
        torch.testing.assert_close(ours[row, kept], logits[row, kept])


def _bitmask(allowed: set[int], words: int = 2) -> np.ndarray:
    """llguidance's layout, built by hand: token t is bit t % 32 of int32 word t // 32."""
    mask = np.zeros(words, dtype=np.uint32)
    for token in allowed:
        mask[token // 32] |= np.uint32(1 << (token % 32))
    return mask.view(np.int32)


def test_a_token_mask_leaves_only_its_tokens_in_its_row_and_touches_no_other_row() -> None:
    logits = _logits(3, seed=12)
    # 31 and 32 straddle a word; 33 and 49 set bits in the second, 31 the sign bit.
    allowed = {0, 31, 32, 49}
    plain = SamplingParams()
    ours = adjust_logits(logits.clone(), [plain] * 3, [None] * 3, [None, _bitmask(allowed), None])
    assert {t for t in range(VOCAB) if ours[1, t] != float("-inf")} == allowed
    torch.testing.assert_close(ours[1, sorted(allowed)], logits[1, sorted(allowed)])
    torch.testing.assert_close(ours[[0, 2]], logits[[0, 2]])
    # A mask shorter than the vocabulary allows nothing past its last word.
    short = adjust_logits(logits[:1].clone(), [plain], [None], [_bitmask({0, 5}, words=1)])
    assert {t for t in range(VOCAB) if short[0, t] != float("-inf")} == {0, 5}


def test_a_token_mask_intersects_the_allowed_tokens_and_wins_where_they_disagree() -> None:
    logits = _logits(2, seed=13)
    params = [SamplingParams(allowed_token_ids=[3, 4, 5]), SamplingParams(allowed_token_ids=[9])]
    masks = [_bitmask({4, 5, 6}), _bitmask({1, 2})]
    ours = adjust_logits(logits.clone(), params, [None, None], masks)
    assert {t for t in range(VOCAB) if ours[0, t] != float("-inf")} == {4, 5}
    # Nothing both allow: the grammar's tokens (the output must stay valid).
    assert {t for t in range(VOCAB) if ours[1, t] != float("-inf")} == {1, 2}


def test_a_ban_that_would_empty_a_masked_row_leaves_the_grammars_tokens() -> None:
    # The grammar allows only eos (2), which min_tokens bans: the grammar wins.
    logits = _logits(1, seed=14)
    params = SamplingParams(min_tokens=3)
    ours = adjust_logits(logits.clone(), [params], [_history([1], [], (2,))], [_bitmask({2})])
    assert {t for t in range(VOCAB) if ours[0, t] != float("-inf")} == {2}


def test_greedy_and_random_rows_never_sample_outside_their_token_mask() -> None:
    logits = _logits(1, seed=15).expand(500, -1).clone()
    allowed = {7, 40, 41}
    masks = [_bitmask(allowed)] * 500
    out = sample(logits, [SamplingParams(seed=2)] * 500, [make_generator(2)] * 500, None, masks)
    assert set(out.token_ids) == allowed
    greedy = sample(logits[:2], [SamplingParams.greedy()] * 2, [None] * 2, None, [masks[0], None])
    assert greedy.token_ids == [
        max(allowed, key=lambda t: float(logits[0, t])),
        int(logits[0].argmax()),
    ]
    # Logprobs stay those of the raw distribution, as for every other constraint.
    scored = sample(logits[:1], [SamplingParams.greedy(logprobs=0)], [None], None, masks[:1])
    expected = logits[0].log_softmax(-1)[scored.token_ids[0]]
    assert scored.logprobs[0] == pytest.approx(float(expected), abs=1e-6)
