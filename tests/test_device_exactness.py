"""The model and the engine on this machine's accelerator when it has one (CUDA: the compiled
Triton kernels and SDPA), else on CPU: a ragged step of prefill chunks and decodes gives HF
transformers' logits (computed on CPU in fp32) within tolerance, and the engine's greedy tokens
under heavy interleaving equal each request run alone on the same device and backend.

CI runs it on CPU. On a GPU machine (benchmarks/gpu_session.sh) it is the end-to-end check of
the GPU path: weights loaded onto the device, paged KV there, the backend's kernels in a real
model, and the engine's model thread driving them.
"""

from __future__ import annotations

import random

import pytest
import torch

import medha
from medha import SamplingParams
from medha.model.kv_cache import KVCache
from medha.model.runner import ModelRunner, StepSeq, load_model
from medha.model.setup import build_runner
from medha.model.single import generate_single
from tests.engine_support import MODEL, engine_config, run_all_greedy
from tests.hf_models import VOCAB, hf_arch, hf_logits, hf_model, max_relative_error
from tests.runner_support import BLOCK_SIZE, ShuffledBlocks, blocks_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CPU: the kernels' interpreter runs are tests/test_triton_attention.py's.
BACKENDS = ["triton", "sdpa"] if DEVICE == "cuda" else ["sdpa"]
VARIANT = "llama3-gqa"


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def _device_runner(backend: str, dtype: torch.dtype) -> ModelRunner:
    state = hf_model(VARIANT).state_dict()
    arch = hf_arch(VARIANT)
    model = load_model(arch, lambda name, dt: state[name].to(dt), dtype, DEVICE)
    return ModelRunner(model, KVCache(arch, 64, BLOCK_SIZE, dtype, DEVICE), backend)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ragged_step_gives_hf_logits_on_the_device(
    backend: str, dtype: torch.dtype, tolerance: float
) -> None:
    runner = _device_runner(backend, dtype)
    blocks = ShuffledBlocks(64, seed=5)
    long_prompt, short_prompt, decoded = _prompt(1, 70), _prompt(2, 33), _prompt(3, 21)
    tables = [blocks.take(blocks_for(n + 1)) for n in (70, 33, 21)]
    # Step 1: a first chunk of the long prompt, a whole short prompt, and a prompt whose last
    # token is left for step 2's decode.
    first = runner.step(
        [
            StepSeq(long_prompt[:40], 0, tables[0]),
            StepSeq(short_prompt, 0, tables[1]),
            StepSeq(decoded[:-1], 0, tables[2]),
        ],
        all_logits=True,
    )
    # Step 2: the long prompt's second chunk over its cached first, beside a decode.
    second = runner.step(
        [StepSeq(long_prompt[40:], 40, tables[0]), StepSeq(decoded[-1:], 20, tables[2])],
        all_logits=True,
    )
    assert first.device.type == DEVICE
    long_logits = torch.cat([first[:40], second[:30]]).cpu()
    short_logits = first[40:73].cpu()
    decoded_logits = torch.cat([first[73:], second[30:]]).cpu()
    for got, prompt in (
        (long_logits, long_prompt),
        (short_logits, short_prompt),
        (decoded_logits, decoded),
    ):
        assert got.shape == (len(prompt), VOCAB)
        assert max_relative_error(got, hf_logits(VARIANT, prompt)) <= tolerance


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("backend", BACKENDS)
async def test_engine_greedy_tokens_under_interleaving_equal_each_request_alone(
    backend: str,
) -> None:
    rng = random.Random(11)
    work = [
        (tuple(rng.randrange(512) for _ in range(rng.randint(3, 300))), rng.randint(2, 12))
        for _ in range(8)
    ]
    # The CPU-calibrated profile with a tiny budget: small chunks, batched together, whatever
    # the device's real speed.
    config = engine_config(device=DEVICE, attention_backend=backend, target_batch_time=0.002)
    async with medha.Engine(config, record_iterations=True) as engine:
        results = await run_all_greedy(engine, work, stagger=0.003)
        history = engine.iteration_history
        stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks
    assert any(len(record.tokens) >= 3 for record in history), "requests never shared a batch"
    runner, tokenizer = build_runner(MODEL, num_blocks=64, device=DEVICE, attention_backend=backend)
    for (prompt, max_tokens), tokens in zip(work, results, strict=True):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        alone = [t.token_id for t in generate_single(runner, list(prompt), params, tokenizer)]
        assert tokens == alone
