"""Shared set-up of the multi-process tests: a small checkpoint whose shapes exercise every
sharding rule, its HF transformers twin as ground truth, and a multi-process engine runner that
also collects the logits the sampling worker saw."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import torch

import medha
from medha import SamplingParams
from tests.engine_support import cost_profile_path
from tests.hf_models import greedy_continuation

# Odd vocabulary (uneven vocab-parallel shards), q/k/v/o and MLP biases (row-parallel biases are
# added once), GQA (kv heads split over TP ranks), 3 layers (uneven pipeline stages).
PARALLEL_TEST_CONFIG: dict[str, Any] = {
    "vocab_size": 503,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": True,
    "mlp_bias": True,
    "torch_dtype": "float32",
}
KVP_TOKENS = 96
"""max_tokens_per_kvp_group in the tests: long prompts below span two KVP groups."""


@cache
def model_folder() -> Path:
    import tempfile

    from medha.model.presets import write_random_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="medha-parallel-test-")) / "model"
    write_random_checkpoint(folder, PARALLEL_TEST_CONFIG, seed=7)
    return folder


@cache
def hf_twin() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder(), torch_dtype=torch.float32)
    # Plain greedy decoding to the full length: without an eos, generate neither stops early nor
    # suppresses any token (min_new_tokens would ban eos, which greedy decoding may pick).
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_twin()(torch.tensor([ids])).logits[0].float()


def assert_prompt_logprobs_equal_hf(completion: medha.Completion, top: int) -> None:
    """`completion`'s prompt logprobs against HF's: the prompt token's within 1e-4, the `top`
    most likely ids exactly (random weights spread the logits: no near ties)."""
    prompt = completion.prompt_token_ids
    reference = hf_logits(prompt).log_softmax(-1)
    logprobs, tops = completion.prompt_logprobs, completion.prompt_top_logprobs
    assert logprobs is not None and tops is not None
    assert len(logprobs) == len(tops) == len(prompt)
    assert logprobs[0] is None and tops[0] is None
    expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(logprobs[1:]), expected, atol=1e-4, rtol=0)
    best = reference[:-1].topk(top, dim=-1) if top else None
    for position, row in enumerate(tops[1:]):
        assert row is not None
        if best is None:
            assert row == ()
            continue
        assert [t.token_id for t in row] == best.indices[position].tolist()
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in row]), best.values[position], atol=1e-4, rtol=0
        )


def hf_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    return greedy_continuation(hf_twin(), prompt, new_tokens)


@cache
def _single_runner() -> Any:
    from medha.model.setup import build_runner

    return build_runner(str(model_folder()), num_blocks=256)


def single_process_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    """The single-process model runner's greedy tokens for `prompt`, alone."""
    from medha.model.single import generate_single

    runner, tokenizer = _single_runner()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [t.token_id for t in generate_single(runner, prompt, params, tokenizer, (), 64)]


def workload(seed: int, count: int, long_prompts: int) -> list[tuple[list[int], int]]:
    """`count` requests; the first `long_prompts` span two KVP groups (prompt + output up to
    2 * KVP_TOKENS tokens), the others are short."""
    rng = random.Random(seed)
    work = []
    for i in range(count):
        if i < long_prompts:
            length = rng.randint(KVP_TOKENS + 10, 2 * KVP_TOKENS - 20)
        else:
            length = rng.randint(3, 40)
        work.append(([rng.randrange(503) for _ in range(length)], rng.randint(4, 10)))
    return work


def parallel_config(tp: int, pp: int, kvp: int, **overrides: Any) -> medha.EngineConfig:
    settings: dict[str, Any] = {
        "model": str(model_folder()),
        "cost_profile": cost_profile_path(str(model_folder())),
        "num_blocks": 64,
        "target_batch_time": 0.004,
        "parallel": medha.ParallelConfig(
            tp=tp,
            pp=pp,
            kvp=kvp,
            max_tokens_per_kvp_group=KVP_TOKENS if kvp > 1 else None,
            timeout_s=120,  # a hang fails the test in minutes, not after the 300 s default
        ),
    }
    settings.update(overrides)
    return medha.EngineConfig(**settings)


async def run_concurrently(
    engine: medha.Engine, work: list[tuple[list[int], int]], stagger: float = 0.002
) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in work]

    async def one(i: int) -> None:
        await anyio.sleep(stagger * i)
        prompt, max_tokens = work[i]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        results[i] = (await engine.generate(prompt, params, request_id=f"r{i}")).token_ids

    async with anyio.create_task_group() as group:
        for i in range(len(work)):
            group.start_soon(one, i)
    return results


def logits_by_request(logits_log: list[tuple[Any, Any]]) -> dict[str, list[torch.Tensor]]:
    """The sampling rows of every completed plan, per request, in order."""
    rows: dict[str, list[torch.Tensor]] = {}
    for plan, logits in logits_log:
        sampling = [seq.request_id for seq in plan.seqs if seq.samples]
        assert logits.shape[0] == len(sampling)
        for request_id, row in zip(sampling, logits, strict=True):
            rows.setdefault(request_id, []).append(row)
    return rows
