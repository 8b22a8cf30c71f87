"""A Qwen3 checkpoint (per-head q/k norms, YaRN) split over two tensor-parallel workers gives
transformers' greedy tokens: each rank normalises its own heads with the whole, replicated
norm weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import medha
from medha import SamplingParams
from tests.engine_support import cost_profile_path
from tests.hf_models import greedy_continuation
from tests.parallel_support import PARALLEL_TEST_CONFIG, parallel_config

pytestmark = pytest.mark.anyio

QWEN3_CONFIG = {
    **PARALLEL_TEST_CONFIG,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 24,
    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_qwen3_at_tp2_gives_transformers_greedy_tokens() -> None:
    from transformers import AutoModelForCausalLM

    from medha.model.presets import write_random_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="medha-qwen3-test-")) / "model"
    write_random_checkpoint(folder, QWEN3_CONFIG, seed=11)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = [[(7 * i + 3) % 503 for i in range(length)] for length in (5, 40, 300)]
    params = SamplingParams.greedy(6, ignore_eos=True)
    config = parallel_config(
        2, 1, 1, model=str(folder), cost_profile=cost_profile_path(str(folder))
    )
    async with medha.Engine(config) as engine:
        for prompt in prompts:
            completion = await engine.generate(prompt, sampling=params)
            assert completion.token_ids == greedy_continuation(hf, prompt, 6), len(prompt)
