"""Medha's Triton attention kernels against the GPU's measured limits (needs CUDA; H100/H200).

a. Ceilings, measured first: device-to-device copy bandwidth (read + write bytes) and a large
   bf16 matmul's TFLOP/s.
b. Chunked-prefill attention, Llama-3-8B head layout (32 q heads, 8 kv heads, D=128, bf16), a chunk
   of 32 / 128 / 512 / 2048 tokens at the end of a 128K / 512K / 1M-token context: TFLOP/s and
   its fraction of the matmul ceiling; at 1M, the per-token cost of a 32-token chunk relative to
   a 2048-token chunk (paper: about 1.11x).
c. Decode attention over 128K / 1M keys, batch 1 and 8: GB/s of K/V read and its fraction of the
   copy ceiling (paper: MBU up to 92%).
d. The same cases through torch SDPA's flash backend, over the same K/V memory, as the baseline
   ratio (decode rows also record the relative difference of the two outputs). SDPA's causal mask is top-left aligned, so its chunk attends to all keys (non-causal):
   at most chunk/2 extra keys per query, under 1% of the work here; both are credited the same
   useful FLOPs.
e. End-to-end prefill of a Llama-3-8B-shaped model with random bf16 weights through medha's model
   code and the triton backend: an 8K prompt in chunks of 512, MFU against the nominal bf16 peak
   of the GPU (when known) and against the measured matmul ceiling.

Targets (issue 6): attention >= 60% of the matmul ceiling at long context, decode >= 80% of the
copy ceiling, chunk-32 cost <= 1.15x chunk-2048, end-to-end prefill MFU >= 50%.

Block tables are contiguous, so SDPA can read the very same K/V memory; one extra row of each
kind uses scrambled blocks to show that block order costs nothing. Times are the median of
several repeats, each the mean over back-to-back calls (so host launch overhead overlaps).
Memory: the largest case (decode, batch 8 x 1M keys) holds 32 GiB of K/V.

    python benchmarks/gpu_attention.py [--json benchmarks/results/gpu_attention.json] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medha.kernels import AttentionMetadata, triton_attention
from medha.kernels.layout import new_kv_pool
from medha.model.arch import ModelArch
from medha.model.kv_cache import KVCache
from medha.model.llama import LlamaForCausalLM
from medha.model.runner import ModelRunner, StepSeq
from medha.perf.models import LLAMA_3_8B

K = 1024
# Dense bf16 tensor-core peak (TFLOP/s) by device name; the MFU denominator.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0}
TARGETS = {
    "attention_fraction_of_matmul": 0.60,
    "decode_fraction_of_copy": 0.80,
    "chunk32_over_chunk2048_per_token": 1.15,
    "prefill_mfu": 0.50,
}


@dataclass(frozen=True)
class Sizes:
    heads: tuple[int, int, int] = (32, 8, 128)
    """(query heads, kv heads, head dim): Llama-3-8B."""
    prefill_kv: tuple[int, ...] = (128 * K, 512 * K, 1024 * K)
    chunks: tuple[int, ...] = (32, 128, 512, 2048)
    decode_kv: tuple[int, ...] = (128 * K, 1024 * K)
    decode_batch: tuple[int, ...] = (1, 8)
    copy_bytes: int = 2 * 2**30
    matmul_n: tuple[int, ...] = (8192, 16384)
    arch: ModelArch = LLAMA_3_8B
    prompt: int = 8 * K
    prompt_chunk: int = 512
    block_size: int = 16
    repeats: int = 5
    dtype: torch.dtype = torch.bfloat16


QUICK = Sizes(prefill_kv=(128 * K,), decode_kv=(128 * K,), matmul_n=(8192,), repeats=3)


@dataclass
class Report:
    device: str
    ceilings: dict[str, float] = field(default_factory=dict)
    prefill: list[dict[str, Any]] = field(default_factory=list)
    decode: list[dict[str, Any]] = field(default_factory=list)
    e2e: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call: median over `repeats` of the mean over back-to-back calls."""
    fn()  # warm-up: compiles, autotunes, caches plans
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    calls = max(1, min(50, int(0.2 / max(once, 1e-6))))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / calls)
        else:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


# -- a. ceilings ---------------------------------------------------------------------------


def measure_ceilings(sizes: Sizes, device: torch.device) -> dict[str, float]:
    return {"copy_gbps": copy_gbps(sizes, device), "matmul_tflops": matmul_tflops(sizes, device)}


def copy_gbps(sizes: Sizes, device: torch.device) -> float:
    """Device-to-device copy: bytes read plus bytes written per second."""
    src = torch.empty(sizes.copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, sizes.repeats)
    return 2 * sizes.copy_bytes / seconds / 1e9


def matmul_tflops(sizes: Sizes, device: torch.device) -> float:
    """The best of square matmuls of each size in `sizes.matmul_n`."""
    best = 0.0
    for n in sizes.matmul_n:
        a, b, c = (torch.randn(n, n, dtype=sizes.dtype, device=device) for _ in "abc")
        seconds = timed(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), device, sizes.repeats)
        best = max(best, 2 * n**3 / seconds / 1e12)
    return best


# -- b/c/d. attention ----------------------------------------------------------------------


def make_cache(
    sizes: Sizes, tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools laid out as the engine's KVCache lays them out (head-major)."""
    _, kv_heads, head_dim = sizes.heads
    shape = (-(-tokens // sizes.block_size), sizes.block_size, kv_heads, head_dim)
    k, v = (new_kv_pool(*shape, sizes.dtype, device).normal_() for _ in "kv")
    return k, v


def sequence_tables(
    sizes: Sizes, batch: int, kv_len: int, shuffled: bool, seed: int = 0
) -> list[list[int]]:
    """Block tables of `batch` sequences of kv_len keys each, in consecutive blocks (sequence b's
    keys at tokens [b * kv_len, (b + 1) * kv_len) of the pool) or scrambled."""
    per_seq = kv_len // sizes.block_size
    ids = torch.arange(batch * per_seq)
    if shuffled:
        ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    return ids.view(batch, per_seq).tolist()


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, Lq, D] against k/v [B, Hkv, L, D] (GQA) with SDPA's flash backend only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def as_dense(cache: torch.Tensor, batch: int, kv_len: int) -> torch.Tensor:
    """The first batch * kv_len slots of a pool as [B, Hkv, kv_len, D] (a view, no copy)."""
    flat = cache.view(-1, *cache.shape[2:])[: batch * kv_len]
    return flat.view(batch, kv_len, *cache.shape[2:]).transpose(1, 2)


def run_case(
    sizes: Sizes,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    batch: int,
    kv_len: int,
    q_len: int,
    shuffled: bool,
    baseline: bool,
) -> dict[str, Any]:
    """One attention case: `batch` sequences of kv_len keys whose last q_len are the queries."""
    num_heads, _, head_dim = sizes.heads
    device = k.device
    scale = head_dim**-0.5
    meta = AttentionMetadata.build(
        q_lens=[q_len] * batch,
        q_start_pos=[kv_len - q_len] * batch,
        kv_lens=[kv_len] * batch,
        block_tables=sequence_tables(sizes, batch, kv_len, shuffled),
        block_size=sizes.block_size,
        device=device,
    )
    q = torch.randn(batch * q_len, num_heads, head_dim, dtype=sizes.dtype, device=device)
    seconds = timed(lambda: triton_attention(q, k, v, meta, scale), device, sizes.repeats)
    pairs = batch * (q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2)
    row: dict[str, Any] = {
        "batch": batch,
        "kv_len": kv_len,
        "q_len": q_len,
        "shuffled_blocks": shuffled,
        "ms": seconds * 1e3,
        "tflops": 4 * num_heads * head_dim * pairs / seconds / 1e12,
        "gbps": kv_bytes(sizes, batch, kv_len) / seconds / 1e9,
    }
    if baseline and not shuffled:
        qd = q.view(batch, q_len, num_heads, head_dim).transpose(1, 2)
        kd, vd = as_dense(k, batch, kv_len), as_dense(v, batch, kv_len)
        try:
            base = timed(lambda: sdpa_flash(qd, kd, vd, scale), device, sizes.repeats)
            row["sdpa_ms"] = base * 1e3
            row["speedup_vs_sdpa"] = base / seconds
            if q_len == 1:  # same semantics (every key visible): a correctness check on the GPU
                ours = triton_attention(q, k, v, meta, scale)[0].float()
                theirs = sdpa_flash(qd, kd, vd, scale).transpose(1, 2).reshape(ours.shape).float()
                row["rel_error_vs_sdpa"] = float((ours - theirs).norm() / theirs.norm())
        except RuntimeError as err:  # no flash kernel for this GPU / dtype / shape
            row["sdpa_error"] = str(err).splitlines()[0]
    return row


def kv_bytes(sizes: Sizes, batch: int, kv_len: int) -> int:
    _, kv_heads, head_dim = sizes.heads
    return 2 * batch * kv_len * kv_heads * head_dim * torch.empty((), dtype=sizes.dtype).itemsize


def prefill_cases(sizes: Sizes, device: torch.device, ceilings: dict[str, float]) -> list[dict]:
    k, v = make_cache(sizes, max(sizes.prefill_kv), device)
    rows = []
    for kv_len in sizes.prefill_kv:
        for chunk in sizes.chunks:
            row = run_case(
                sizes, k, v, batch=1, kv_len=kv_len, q_len=chunk, shuffled=False, baseline=True
            )
            rows.append(row)
    kv_len, chunk = max(sizes.prefill_kv), sizes.chunks[len(sizes.chunks) // 2]
    rows.append(
        run_case(sizes, k, v, batch=1, kv_len=kv_len, q_len=chunk, shuffled=True, baseline=False)
    )
    for row in rows:
        row["fraction_of_matmul"] = row["tflops"] / ceilings["matmul_tflops"]
    del k, v
    _free(device)
    return rows


def decode_cases(sizes: Sizes, device: torch.device, ceilings: dict[str, float]) -> list[dict]:
    rows = []
    for batch in sizes.decode_batch:
        k, v = make_cache(sizes, batch * max(sizes.decode_kv), device)
        for kv_len in sizes.decode_kv:
            rows.append(
                run_case(
                    sizes, k, v, batch=batch, kv_len=kv_len, q_len=1, shuffled=False, baseline=True
                )
            )
        if batch == min(sizes.decode_batch):
            kv_len = max(sizes.decode_kv)
            rows.append(
                run_case(
                    sizes, k, v, batch=batch, kv_len=kv_len, q_len=1, shuffled=True, baseline=False
                )
            )
        del k, v
        _free(device)
    for row in rows:
        row["fraction_of_copy"] = row["gbps"] / ceilings["copy_gbps"]
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- e. end-to-end prefill -----------------------------------------------------------------


def random_model(arch: ModelArch, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The model as `medha.model.runner.load_model` lays it out, with random weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.pack_weights(copy=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model.eval()


def prefill_flops(arch: ModelArch, prompt: int) -> float:
    """Matmul FLOPs of the projections and MLP, attention over the causal prefix, one LM-head row."""
    h, d = arch.hidden_size, arch.head_dim
    per_token = h * (arch.num_heads + 2 * arch.num_kv_heads) * d  # q, k, v
    per_token += arch.num_heads * d * h + 3 * h * arch.intermediate_size  # o, gate/up/down
    linear = 2 * per_token * prompt * arch.num_layers
    attention = 4 * arch.num_heads * d * (prompt * (prompt + 1) // 2) * arch.num_layers
    return float(linear + attention + 2 * h * arch.vocab_size)


def end_to_end(sizes: Sizes, device: torch.device, ceilings: dict[str, float]) -> dict[str, Any]:
    arch = sizes.arch
    model = random_model(arch, sizes.dtype, device)
    blocks = -(-sizes.prompt // sizes.block_size)
    cache = KVCache(arch, blocks, sizes.block_size, sizes.dtype, device)
    runner = ModelRunner(model, cache, "triton")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (sizes.prompt,), generator=gen).tolist()
    table = list(range(blocks))

    def prefill() -> torch.Tensor:
        logits = None
        for start in range(0, sizes.prompt, sizes.prompt_chunk):
            chunk = ids[start : start + sizes.prompt_chunk]
            last = start + len(chunk) == sizes.prompt
            logits = runner.step([StepSeq(chunk, start, table, sample=last)])
        assert logits is not None
        return logits

    seconds = timed(prefill, device, max(3, sizes.repeats // 2))
    flops = prefill_flops(arch, sizes.prompt)
    achieved = flops / seconds / 1e12
    peak = nominal_peak(device)
    return {
        "backend": runner.backend_name,
        "prompt": sizes.prompt,
        "chunk": sizes.prompt_chunk,
        "seconds": seconds,
        "tokens_per_s": sizes.prompt / seconds,
        "tflops": achieved,
        "nominal_peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "fraction_of_matmul": achieved / ceilings["matmul_tflops"],
    }


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


# -- report --------------------------------------------------------------------------------


def summarize(report: Report, sizes: Sizes) -> dict[str, Any]:
    """The four target quantities (smallest over largest chunk for the per-token ratio) and
    whether each meets its target."""
    longest, small, large = max(sizes.prefill_kv), min(sizes.chunks), max(sizes.chunks)
    at_longest = [r for r in report.prefill if r["kv_len"] == longest and not r["shuffled_blocks"]]
    per_token = {r["q_len"]: r["ms"] / r["q_len"] for r in at_longest}
    values = {
        "attention_fraction_of_matmul": max(
            (r["fraction_of_matmul"] for r in at_longest if r["q_len"] == large), default=None
        ),
        "decode_fraction_of_copy": max(
            (r["fraction_of_copy"] for r in report.decode), default=None
        ),
        "chunk32_over_chunk2048_per_token": per_token[small] / per_token[large],
        "prefill_mfu": report.e2e.get("mfu"),
    }
    return {**values, "meets_target": {key: _meets(key, v) for key, v in values.items()}}


def _meets(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    return value <= TARGETS[key] if key.startswith("chunk") else value >= TARGETS[key]


def print_report(report: Report) -> None:
    from rich.console import Console

    console = Console()
    c = report.ceilings
    console.print(
        f"[bold]{report.device}[/bold]: copy {c['copy_gbps']:.0f} GB/s, "
        f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s"
    )
    prefill_cols = ("chunk", "TFLOP/s", "of matmul")
    console.print(
        _table("chunked-prefill attention (Triton vs SDPA flash)", report.prefill, prefill_cols)
    )
    decode_cols = ("batch", "GB/s", "of copy")
    console.print(
        _table("decode attention (flash-decoding vs SDPA flash)", report.decode, decode_cols)
    )
    e = report.e2e
    console.print(
        f"end-to-end prefill ({e['backend']}): {e['prompt']} tokens in chunks of {e['chunk']}: "
        f"{e['seconds'] * 1e3:.0f} ms, {e['tflops']:.0f} TFLOP/s, MFU {_opt(e['mfu'], '.0%')} "
        f"({e['fraction_of_matmul']:.0%} of the measured matmul ceiling)"
    )
    console.print_json(data=report.summary)


def _table(title: str, rows: list[dict[str, Any]], cols: tuple[str, str, str]) -> Any:
    """A rich table of attention rows; `cols` names the size, rate and fraction columns."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("KV", cols[0], "blocks", "ms", *cols[1:], "SDPA ms", "speedup"):
        table.add_column(col, justify="right")
    size, rate, fraction = {
        "chunk": ("q_len", "tflops", "fraction_of_matmul"),
        "batch": ("batch", "gbps", "fraction_of_copy"),
    }[cols[0]]
    for r in rows:
        table.add_row(
            _tokens(r["kv_len"]),
            str(r[size]),
            "shuffled" if r["shuffled_blocks"] else "in order",
            f"{r['ms']:.3f}",
            f"{r[rate]:.0f}",
            f"{r[fraction]:.0%}",
            _opt(r.get("sdpa_ms"), ".3f"),
            _opt(r.get("speedup_vs_sdpa"), ".2f", "x"),
        )
    return table


def _tokens(n: int) -> str:
    return f"{n // (1024 * K)}M" if n % (1024 * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


def _opt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def run(sizes: Sizes, device: torch.device) -> Report:
    report = Report(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    report.ceilings = measure_ceilings(sizes, device)
    report.prefill = prefill_cases(sizes, device, report.ceilings)
    report.decode = decode_cases(sizes, device, report.ceilings)
    report.e2e = end_to_end(sizes, device, report.ceilings)
    report.summary = summarize(report, sizes)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="128K only, fewer repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_attention.py measures GPU kernels and needs a CUDA device (an H100 or H200); "
            "none is visible here. On CPU, run the kernels' correctness tests instead: "
            "pytest tests/test_triton_attention.py",
            file=sys.stderr,
        )
        return 2
    sizes = QUICK if args.quick else Sizes()
    device = torch.device("cuda")
    report = run(sizes, device)
    print_report(report)
    if args.json:
        payload = {
            "device": report.device,
            "torch": torch.__version__,
            "triton": importlib.metadata.version("triton"),
            "python": platform.python_version(),
            "sizes": {k: v for k, v in vars(sizes).items() if k not in ("arch", "dtype")},
            "targets": TARGETS,
            "ceilings": report.ceilings,
            "prefill": report.prefill,
            "decode": report.decode,
            "end_to_end_prefill": report.e2e,
            "summary": report.summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
