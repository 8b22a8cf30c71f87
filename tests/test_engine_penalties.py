"""Penalties, min_tokens, allowed tokens, logit bias and top logprobs through the engine:
greedy outputs equal HF transformers' on the same weights (its `generate` for the repetition
penalty and min_new_tokens, a loop over its logits for OpenAI's presence and frequency
penalties), under LARS interleaving, chunking and preemption by recompute."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

import medha
from medha import SamplingParams
from tests.engine_support import engine_config, hf_model

pytestmark = pytest.mark.anyio

EOS = (1, 3)  # tiny-random's

# Prompts that repeat themselves, so a greedy continuation without penalties would too.
PROMPTS = [
    [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6],
    [100, 200, 300, 400] * 30,
    [9, 9, 9, 9, 9],
    list(range(20, 90)) * 2,
]

PARAMS = [
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.8, "min_tokens": 12},
    {"presence_penalty": 1.5, "frequency_penalty": 0.6},
    {"repetition_penalty": 1.2, "frequency_penalty": -0.5, "min_tokens": 20},
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _reference(prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding over HF's logits, the penalties applied densely by their definitions."""
    ids = list(prompt)
    out: list[int] = []
    while len(out) < params.max_tokens:
        with torch.no_grad():
            logits = hf_model()(torch.tensor([ids])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if len(out) < params.min_tokens:
            logits[list(EOS)] = float("-inf")
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in EOS:
            break
    return out


def _hf_generate(prompt: list[int], params: SamplingParams) -> list[int]:
    output = hf_model().generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=params.max_tokens,
        repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_tokens,
        eos_token_id=list(EOS),
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


def _params(i: int, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams.greedy(max_tokens, **PARAMS[i % len(PARAMS)])


def _sampled_params(i: int, max_tokens: int = 40) -> SamplingParams:
    # Seeded draws: any change in a penalised logit moves the draw's interval, so counting a
    # token twice shows more readily than under greedy decoding.
    return SamplingParams(max_tokens=max_tokens, seed=i, **PARAMS[i % len(PARAMS)])


async def _generate_all(
    engine: medha.Engine, count: int, params: Any = _params
) -> list[medha.Completion]:
    results: list[Any] = [None] * count

    async def one(i: int) -> None:
        results[i] = await engine.generate(PROMPTS[i % len(PROMPTS)], params(i))

    async with anyio.create_task_group() as group:
        for i in range(count):
            group.start_soon(one, i)
    return results


async def test_penalised_greedy_outputs_equal_hf_under_interleaving() -> None:
    async with medha.Engine(engine_config(target_batch_time=0.003)) as engine:
        done = await _generate_all(engine, len(PROMPTS))
    for i, completion in enumerate(done):
        params = _params(i)
        expected = _reference(PROMPTS[i], params)
        assert completion.token_ids == expected, f"request {i}"
        if params.frequency_penalty == 0 and params.presence_penalty == 0:
            assert expected == _hf_generate(PROMPTS[i], params), f"request {i}: reference vs HF"
        if params.min_tokens:
            assert len(completion.token_ids) >= params.min_tokens
    # The penalties changed what greedy decoding picks.
    async with medha.Engine(engine_config()) as engine:
        plain = await engine.generate(PROMPTS[0], SamplingParams.greedy(40))
    assert plain.token_ids != done[0].token_ids


@pytest.mark.parametrize("params", [_params, _sampled_params], ids=["greedy", "seeded"])
async def test_penalised_outputs_survive_preemption_by_recompute(params: Any) -> None:
    # Twelve requests of up to 180 tokens in 24 blocks (384 tokens): they are evicted and
    # recomputed, and the recomputed tokens must not count twice in the penalties.
    async with medha.Engine(engine_config(num_blocks=1024)) as engine:
        unconstrained = await _generate_all(engine, 12, params)
    async with medha.Engine(engine_config(num_blocks=24, target_batch_time=0.003)) as engine:
        constrained = await _generate_all(engine, 12, params)
        stats = engine.stats()
    assert stats.preemptions > 0, "the small cache never forced a preemption"
    assert [c.token_ids for c in constrained] == [c.token_ids for c in unconstrained]
    assert stats.free_blocks == stats.total_blocks


async def test_stream_reports_the_top_logprobs_of_the_raw_distribution() -> None:
    prompt = PROMPTS[0]
    params = SamplingParams.greedy(6, logprobs=4, repetition_penalty=1.5, ignore_eos=True)
    async with medha.Engine(engine_config()) as engine:
        events = [ev async for ev in engine.stream(prompt, params)]
        chosen_only = await engine.generate(prompt, SamplingParams.greedy(3, logprobs=0))
        none = await engine.generate(prompt, SamplingParams.greedy(3))
    tokens = [ev.token_id for ev in events]
    assert all(isinstance(t, int) for t in tokens)
    with torch.no_grad():
        logits = hf_model()(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    reference = logits.float().log_softmax(-1)
    for k, event in enumerate(events):
        assert event.top_logprobs is not None and len(event.top_logprobs) == 4
        values, ids = reference[k].topk(4)
        assert [t.token_id for t in event.top_logprobs] == ids.tolist()
        assert [t.logprob for t in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert event.logprob == pytest.approx(float(reference[k, tokens[k]]), abs=1e-4)
    assert chosen_only.logprobs is not None and len(chosen_only.logprobs) == 3
    assert chosen_only.top_logprobs == [(), (), ()]
    assert none.logprobs is None and none.top_logprobs is None


async def test_allowed_tokens_and_logit_bias_steer_greedy_decoding_as_on_hf_logits() -> None:
    prompt = PROMPTS[1][:20]
    allowed = [7, 70, 300, 411]
    params = SamplingParams.greedy(8, allowed_token_ids=allowed, logit_bias={300: 0.5})
    async with medha.Engine(engine_config()) as engine:
        done = await engine.generate(prompt, params)
        forced = await engine.generate(prompt, SamplingParams.greedy(3, logit_bias={123: 100}))
        with pytest.raises(medha.InvalidSamplingParamsError, match="vocabulary size"):
            engine.stream(prompt, SamplingParams(logit_bias={512: 1.0}))
        assert engine.stats().waiting == 0
    ids = list(prompt)
    for token in done.token_ids:
        with torch.no_grad():
            logits = hf_model()(torch.tensor([ids])).logits[0, -1].float()
        scores = {t: float(logits[t]) + (0.5 if t == 300 else 0.0) for t in allowed}
        assert token == max(scores, key=scores.__getitem__)
        ids.append(token)
    assert len(set(done.token_ids)) > 1
    assert forced.token_ids == [123, 123, 123]


async def test_min_tokens_keeps_eos_from_ending_a_request_that_greedy_would_end_at_once() -> None:
    prompt = [352, 117, 500, 315, 207]  # tiny-random's greedy continuation is eos
    async with medha.Engine(engine_config()) as engine:
        plain = await engine.generate(prompt, SamplingParams.greedy(8))
        held = await engine.generate(prompt, SamplingParams.greedy(8, min_tokens=5))
        ignored = await engine.generate(
            prompt, SamplingParams.greedy(8, min_tokens=5, ignore_eos=True)
        )
    assert plain.token_ids[0] in EOS and plain.finish_reason == "stop"
    assert held.token_ids == _reference(prompt, SamplingParams.greedy(8, min_tokens=5))
    assert not set(held.token_ids[:5]) & set(EOS) and len(held.token_ids) > 5
    # vLLM bans eos before min_tokens even with ignore_eos.
    assert not set(ignored.token_ids[:5]) & set(EOS)


async def test_a_vanishing_repetition_penalty_under_a_low_temperature_fails_nothing() -> None:
    # r = 1e-38 takes a seen logit above ~3.4 to the largest float and one above 1.7 past half
    # of it; a temperature of 0.5 then overflowed it to +inf (at later tokens here: the first
    # token's seen logits are at most 1.44), the draw went past the vocabulary, and the engine
    # failed for everyone.
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        first_logits = hf_model()(torch.tensor([prompt])).logits[0, -1]
    # Divided by 1e-38 (below the largest float, ~3.4e38: every logit here is under 3.4), the
    # largest seen logit leads the next one by ~1e37, so the first draw is certain.
    first = max(prompt, key=lambda token: float(first_logits[token]))
    firsts = set()
    async with medha.Engine(engine_config()) as engine:
        for seed in range(6):
            extreme = SamplingParams(
                max_tokens=6, temperature=0.5, repetition_penalty=1e-38, seed=seed
            )
            done = await engine.generate(prompt, extreme)
            assert len(done.token_ids) == 6
            firsts.add(done.token_ids[0])
        after = await engine.generate(PROMPTS[1], SamplingParams.greedy(4))
    assert firsts == {first}
    assert after.token_ids == _reference(PROMPTS[1], SamplingParams.greedy(4))
