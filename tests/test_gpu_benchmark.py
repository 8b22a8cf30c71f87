"""benchmarks/gpu_attention.py runs end to end (on tiny shapes, on CPU through Triton's
interpreter) and refuses clearly without CUDA. Its GPU numbers come from a GPU run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medha.kernels import triton_backend
from medha.model.arch import ModelArch
from medha.model.presets import TINY_RANDOM_CONFIG

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_attention.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_attention", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    torch.cuda.is_available() or not triton_backend.interpreting(),
    reason="the CPU smoke run needs Triton's interpreter",
)
def test_every_section_runs_on_tiny_shapes() -> None:
    bench = load_script()
    sizes = bench.Sizes(
        heads=(4, 2, 16),
        prefill_kv=(48, 80),
        chunks=(2, 16),
        decode_kv=(32, 64),
        decode_batch=(1, 2),
        copy_bytes=2**16,
        matmul_n=(32,),
        arch=ModelArch.from_hf_config(TINY_RANDOM_CONFIG),
        prompt=40,
        prompt_chunk=16,
        repeats=1,
        dtype=torch.float32,
    )
    report = bench.run(sizes, torch.device("cpu"))
    assert len(report.prefill) == 2 * 2 + 1 and len(report.decode) == 2 * 2 + 1
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in report.prefill + report.decode)
    # Decode rows check the kernel against SDPA on the same memory (fp32 here).
    assert all(r["rel_error_vs_sdpa"] < 1e-5 for r in report.decode if "sdpa_ms" in r)
    assert report.e2e["backend"] == "triton" and report.e2e["tflops"] > 0
    assert report.summary["chunk32_over_chunk2048_per_token"] > 0  # chunk 2 over 16 here
    bench.print_report(report)


def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_script().main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
