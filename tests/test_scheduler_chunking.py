"""Adaptive chunk sizing: binary search for the largest chunk that keeps the batch in budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.scheduler import SchedulerConfig, SeqShape
from medha.scheduler.chunking import largest_fitting_chunk
from tests.scheduler_support import Arrival, ToyCost, drive, make_scheduler, step

CONFIG = SchedulerConfig(min_chunk=32, max_chunk=8192, chunk_multiple=32, chunk_tolerance=0.1)


class CountingLinear:
    """time(c) = base + per_token * c, counting calls."""

    def __init__(self, base: float, per_token: float) -> None:
        self.base, self.per_token, self.calls = base, per_token, 0

    def __call__(self, chunk: int) -> float:
        self.calls += 1
        return self.base + self.per_token * chunk


def test_whole_remainder_is_taken_when_it_fits() -> None:
    predict = CountingLinear(0.01, 1e-6)
    choice = largest_fitting_chunk(predict, tokens_left=1000, budget=0.05, config=CONFIG)
    assert choice is not None and choice.tokens == 1000
    assert predict.calls == 1


def test_chunk_is_a_multiple_of_32_within_budget_plus_tolerance() -> None:
    predict = CountingLinear(0.005, 2e-5)  # 0.05 s budget -> ~2250 tokens, +10% -> ~2500
    choice = largest_fitting_chunk(predict, tokens_left=100_000, budget=0.05, config=CONFIG)
    assert choice is not None
    assert choice.tokens % 32 == 0
    assert 0.05 * 0.9 <= choice.predicted_time <= 0.05 * 1.1
    assert choice.predicted_time == predict(choice.tokens)


def test_search_reaches_the_configured_maximum_not_a_smaller_cap() -> None:
    predict = CountingLinear(0.0, 1e-7)
    choice = largest_fitting_chunk(predict, tokens_left=1_000_000, budget=0.05, config=CONFIG)
    assert choice is not None and choice.tokens == 8192


def test_none_when_even_the_minimum_chunk_exceeds_the_budget() -> None:
    predict = CountingLinear(0.06, 1e-6)
    assert largest_fitting_chunk(predict, tokens_left=5000, budget=0.05, config=CONFIG) is None


def test_a_tail_shorter_than_the_minimum_chunk_is_offered_whole() -> None:
    predict = CountingLinear(0.01, 1e-6)
    choice = largest_fitting_chunk(predict, tokens_left=7, budget=0.05, config=CONFIG)
    assert choice is not None and choice.tokens == 7


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.0, 0.06),
    per_token=st.floats(1e-8, 1e-3),
    quadratic=st.floats(0.0, 1e-8),
    tokens_left=st.integers(1, 200_000),
)
def test_search_finds_a_chunk_in_the_band_or_the_largest_fitting_one_in_log_calls(
    base: float, per_token: float, quadratic: float, tokens_left: int
) -> None:
    calls = 0

    def predict(chunk: int) -> float:
        nonlocal calls
        calls += 1
        return base + per_token * chunk + quadratic * chunk * chunk

    budget = 0.05
    choice = largest_fitting_chunk(predict, tokens_left, budget, CONFIG)
    grid_points = CONFIG.max_chunk // CONFIG.chunk_multiple
    assert calls <= 3 + math.ceil(math.log2(grid_points))
    top = min(tokens_left, CONFIG.max_chunk)
    if choice is None:
        assert predict(min(top, CONFIG.min_chunk)) > budget * 1.1
        return
    assert 1 <= choice.tokens <= top
    assert choice.predicted_time <= budget * 1.1
    assert choice.tokens == top or choice.tokens % CONFIG.chunk_multiple == 0
    if choice.tokens < top and choice.predicted_time < budget * 0.9:
        # Not in the accepted band: then it must be the largest grid point that fits.
        bigger = min(choice.tokens + CONFIG.chunk_multiple, top)
        assert predict(bigger) > budget * 1.1


def test_chunks_of_a_long_prompt_shrink_as_its_kv_cache_grows() -> None:
    scheduler = make_scheduler(target_batch_time=0.05)
    result = drive(scheduler, [Arrival("long", 0.0, 60_000, 1)])
    sizes = [end - start for start, end in result.chunks_of("long")]
    assert sum(sizes) == 60_000
    assert sizes[0] > 4 * sizes[-2]  # early chunks are large, late ones small
    third = len(sizes) // 3
    means = [sum(part) / len(part) for part in (sizes[:third], sizes[third:-third], sizes[-third:])]
    assert means[0] > means[1] > means[2]


def test_every_adaptive_batch_stays_within_the_budget_unless_decodes_alone_exceed_it() -> None:
    cost = ToyCost()
    scheduler = make_scheduler(cost, target_batch_time=0.05)
    arrivals = [Arrival(f"r{i}", 0.01 * i, 3000 + 500 * i, 8) for i in range(20)]
    result = drive(scheduler, arrivals)
    over_budget_to_finish = 0
    for plan in result.plans:
        single_prefill_at_minimum = len(plan.prefills) == 1 and plan.prefills[0].q_tokens <= 32
        finishes_a_prompt = any(seq.samples for seq in plan.prefills)
        if plan.predicted_time > 0.05 * 1.1 and not single_prefill_at_minimum:
            assert finishes_a_prompt and plan.predicted_time <= 0.05 * 1.25
            over_budget_to_finish += 1
    assert over_budget_to_finish  # the workload exercises the finishing allowance


def test_a_rest_that_finishes_its_prompt_may_run_to_the_finish_tolerance() -> None:
    predict = CountingLinear(0.01, 2e-5)  # 0.05 s budget: ~2000 tokens, 1.25 x: ~2625
    budget = 0.05
    whole = largest_fitting_chunk(predict, 2600, budget, CONFIG, finishes=True)
    assert whole is not None and whole.tokens == 2600
    assert budget * 1.1 < whole.predicted_time <= budget * 1.25
    # The same tokens short of the prompt's end (more follow, or a KVP boundary) are chunked.
    partial = largest_fitting_chunk(predict, 2600, budget, CONFIG, finishes=False)
    assert partial is not None and partial.tokens % 32 == 0
    assert partial.predicted_time <= budget * 1.1
    # A rest beyond the allowance is chunked as usual, not cut to fit the allowance.
    beyond = largest_fitting_chunk(predict, 2700, budget, CONFIG, finishes=True)
    assert beyond is not None and beyond.tokens == partial.tokens


def test_finish_tolerance_zero_leaves_the_ordinary_tolerance() -> None:
    predict = CountingLinear(0.01, 2e-5)
    strict = CONFIG.model_copy(update={"finish_tolerance": 0.0})
    within = largest_fitting_chunk(predict, 2200, 0.05, strict, finishes=True)
    assert within is not None and within.tokens == 2200
    choice = largest_fitting_chunk(predict, 2600, 0.05, strict, finishes=True)
    assert choice is not None and choice.tokens < 2600 and choice.predicted_time <= 0.05 * 1.1


def test_a_prompt_just_over_the_budget_gets_its_first_token_one_iteration_sooner() -> None:
    # 2400 tokens alone take ~53 ms + the 5 ms overhead: over 1.1 x 50 ms, within 1.25 x.
    firsts = {}
    for tolerance in (0.0, 0.25):
        scheduler = make_scheduler(ToyCost(), target_batch_time=0.05, finish_tolerance=tolerance)
        result = drive(scheduler, [Arrival("r", 0.0, 2400, 2)])
        firsts[tolerance] = result.chunks_of("r")
    assert firsts[0.25] == [(0, 2400)]
    assert len(firsts[0.0]) == 2 and firsts[0.0][-1][1] == 2400


def test_a_prompt_riding_along_whole_stays_within_max_chunk() -> None:
    """Where a batch's time hardly grows with its tokens (a memory-bound floor), a second prompt
    could join a batch already in its band with its whole rest: it must still respect
    max_chunk, and so not overtake the first-ranked prompt, which is held to it."""
    scheduler = make_scheduler(
        ToyCost(linear_floor=0.045), target_batch_time=0.05, max_chunk=256, num_blocks=4096
    )
    result = drive(scheduler, [Arrival("a", 0.0, 1000, 4), Arrival("b", 0.0, 1000, 4)])
    chunks = {name: [end - start for start, end in result.chunks_of(name)] for name in "ab"}
    assert all(size <= 256 for sizes in chunks.values() for size in sizes), chunks
    assert sum(chunks["a"]) == sum(chunks["b"]) == 1000
    assert len(chunks["a"]) <= len(chunks["b"])


def test_a_prefill_alone_in_the_scheduler_takes_the_lone_budget() -> None:
    # No decode's latency is at stake: its chunks may fill lone_batch_time (0.15 s).
    scheduler = make_scheduler(target_batch_time=0.05, lone_batch_time=0.15)
    scheduler.add_request("long", 20_000, 4, arrival=0.0)
    scheduler.add_request("chat", 300, 4, arrival=0.0)
    # Not alone: every batch keeps target_batch_time (the finishing allowance included).
    now = 0.0
    while (chat := scheduler.get("chat")) is not None and not chat.status.is_done:
        plan, _ = step(scheduler, now)
        assert plan.predicted_time <= 0.05 * 1.25
        now += 0.05
    # The chat has left: the long prefill is alone, and its chunk grows to the lone budget.
    plan, _ = step(scheduler, now)
    assert [seq.request_id for seq in plan.seqs] == ["long"]
    assert 0.05 * 1.1 < plan.predicted_time <= 0.15 * 1.1
    # Without lone_batch_time a lone prefill keeps the ordinary budget.
    plain = make_scheduler(target_batch_time=0.05)
    plain.add_request("long", 20_000, 4, arrival=0.0)
    plan, _ = step(plain, 0.0)
    assert plan.predicted_time <= 0.05 * 1.1


def test_a_scored_prompt_is_priced_with_the_lm_head_on_every_row() -> None:
    # prompt_logprobs: its chunks run the LM head on every row, here as costly as the rest of
    # a token's work. Priced so, they are smaller and keep to the budget, and its prefill work
    # (its priority, its default deadline) counts the head too.
    cost = ToyCost(per_head_row=2e-5)
    plain = make_scheduler(cost, target_batch_time=0.05, num_blocks=4096)
    scored = make_scheduler(cost, target_batch_time=0.05, num_blocks=4096)
    reference = plain.add_request("doc", 20_000, 4, arrival=0.0)
    request = scored.add_request("doc", 20_000, 4, arrival=0.0, scores_prompt=True)
    assert request.total_prefill_s == pytest.approx(reference.total_prefill_s + 2e-5 * 19_999)
    request.reprice(cost)  # as when the cost model's prefill level moves
    assert request.total_prefill_s == pytest.approx(reference.total_prefill_s + 2e-5 * 19_999)
    (plain_chunk,) = step(plain, 0.0)[0].seqs
    plan, _ = step(scored, 0.0)
    (chunk,) = plan.seqs
    assert chunk.head_rows == chunk.q_tokens and plain_chunk.head_rows == 1
    assert chunk.q_tokens <= 0.6 * plain_chunk.q_tokens
    assert plan.predicted_time == pytest.approx(
        cost.batch_time([SeqShape(chunk.q_tokens, 0, 1, chunk.q_tokens)])
    )
    assert plan.predicted_time <= 0.05 * 1.1
    # What is left of it is priced with the head as well.
    left = 20_000 - chunk.q_tokens
    assert request.remaining_prefill_s(cost) == pytest.approx(
        cost.remaining_prefill_time(chunk.q_tokens, 20_000) + 2e-5 * (left - 1)
    )
