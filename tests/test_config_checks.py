"""A config that cannot work is refused early, with a typed error that says why: at construction
what needs no I/O (names, finite numbers), at engine start what needs the model or the machine
(its context, the device, the device's memory, the backends it runs)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch

from medha import engine_setup
from medha.calibration import calibration_target
from medha.config import ATTENTION_BACKENDS, EngineConfig, ParallelConfig
from medha.engine_setup import build_engine_parts, build_scheduler_config, max_model_len_for
from medha.errors import (
    DeviceUnavailableError,
    InvalidConfigError,
    KVCacheTooLargeError,
    MedhaError,
)
from medha.kernels import attention, backend_names, register_backend
from medha.kernels.sdpa import sdpa_attention
from medha.model import device as device_module
from medha.model import setup as model_setup
from medha.model.arch import ModelArch
from medha.model.device import check_device
from medha.model.kv_cache import KVCache
from medha.model.loader import load_checkpoint
from medha.model.setup import new_kv_cache
from medha.perf import load_profile, save_profile
from tests.engine_support import cost_profile_path

# -- at construction ----------------------------------------------------------------------------


def test_an_unknown_attention_backend_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown attention backend 'bogus'"):
        EngineConfig(model="tiny-random", attention_backend="bogus")


def test_pausing_iterations_is_refused_with_worker_processes() -> None:
    with pytest.raises(pydantic.ValidationError, match="single-process engine"):
        EngineConfig(model="tiny-random", pause_iterations=True, parallel=ParallelConfig(tp=2))
    # Left to its default it is simply off there; off is always accepted.
    EngineConfig(model="tiny-random", parallel=ParallelConfig(tp=2))
    EngineConfig(model="tiny-random", pause_iterations=False, parallel=ParallelConfig(tp=2))


def test_every_backend_medha_registers_is_accepted_whether_or_not_it_runs_here() -> None:
    registered = set(backend_names())  # medha.kernels imported: "triton" registered too
    assert registered <= set(ATTENTION_BACKENDS) and "triton" in registered
    for name in ATTENTION_BACKENDS:
        assert EngineConfig(model="tiny-random", attention_backend=name).attention_backend == name


def test_a_backend_registered_at_run_time_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_registry(monkeypatch)
    register_backend("mine", sdpa_attention, lambda device: True)
    assert EngineConfig(model="tiny-random", attention_backend="mine").attention_backend == "mine"


@pytest.mark.parametrize(
    "field", ["kv_cache_gib", "calibration_seconds", "target_batch_time", "min_deadline"]
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_sizes_and_times_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        EngineConfig.model_validate({"model": "tiny-random", field: value})


def test_an_infinite_worker_timeout_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="timeout_s"):
        ParallelConfig(timeout_s=math.inf)


def test_a_max_chunk_off_the_chunk_granularity_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"max_chunk\n.*multiple of 32"):
        EngineConfig(model="tiny-random", max_chunk=100)
    assert EngineConfig(model="tiny-random", max_chunk=96).max_chunk == 96


@pytest.mark.parametrize(
    "field", ["max_chunk", "fixed_chunk", "max_num_seqs", "block_size", "num_blocks"]
)
def test_a_bool_is_not_a_count(field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=f"{field}\n.*must be an integer, got True"):
        EngineConfig.model_validate({"model": "tiny-random", field: True})


@pytest.mark.parametrize("field", ["tp", "pp", "kvp", "max_tokens_per_kvp_group"])
def test_a_bool_is_not_a_parallel_count(field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=f"{field}\n.*must be an integer"):
        ParallelConfig.model_validate({field: True})


def test_kvp_shards_must_end_on_a_kv_block_boundary() -> None:
    parallel = ParallelConfig(kvp=2, max_tokens_per_kvp_group=40)
    with pytest.raises(pydantic.ValidationError, match=r"\(40\) must be a multiple of block_size"):
        EngineConfig(model="tiny-random", block_size=16, parallel=parallel)
    EngineConfig(model="tiny-random", block_size=8, parallel=parallel)


def test_building_a_config_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from medha.config import EngineConfig\n"
        "EngineConfig(model='tiny-random', attention_backend='triton', device='cuda:3')\n"
        "try:\n"
        "    EngineConfig(model='tiny-random', attention_backend='bogus')\n"
        "except ValueError:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- at engine start ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta"])
def test_a_device_this_machine_lacks_fails_the_start_with_a_typed_error(device: str) -> None:
    config = EngineConfig(model="tiny-random", device=device, num_blocks=16)
    with pytest.raises(DeviceUnavailableError, match=device):
        build_engine_parts(config)


def test_cuda_on_a_cpu_only_torch_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(DeviceUnavailableError, match=r"'cuda:0' is not available: .*no CUDA"):
        check_device("cuda:0")


def test_a_cuda_index_past_the_last_device_names_the_ones_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceUnavailableError, match="cuda:0 to cuda:1"):
        check_device("cuda:2")
    assert check_device("cuda:1") == torch.device("cuda:1")


def test_max_model_len_beyond_the_models_context_fails_the_start_naming_both() -> None:
    config = EngineConfig(model="tiny-random", max_model_len=100_000, num_blocks=16)
    with pytest.raises(InvalidConfigError, match=r"max_model_len=100000 .* 4096"):
        build_engine_parts(config)


def test_max_model_len_up_to_the_context_is_kept() -> None:
    arch = _tiny_arch()
    assert max_model_len_for(EngineConfig(model="tiny-random"), arch) == 4096
    config = EngineConfig(model="tiny-random", max_model_len=4096)
    assert max_model_len_for(config, arch) == 4096


def test_a_linear_rope_scaling_stretches_the_context_as_vllm_reads_it() -> None:
    arch = dataclasses.replace(_tiny_arch(), rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert arch.context_len == 8192
    assert max_model_len_for(EngineConfig(model="tiny-random", max_model_len=8192), arch) == 8192
    with pytest.raises(InvalidConfigError, match="8192"):
        max_model_len_for(EngineConfig(model="tiny-random", max_model_len=8193), arch)


def test_a_kv_cache_larger_than_the_machines_memory_fails_the_start() -> None:
    config = EngineConfig(model="tiny-random", kv_cache_gib=1e6)
    with pytest.raises(KVCacheTooLargeError, match=r"1000000\.0 GiB .* does not fit"):
        build_engine_parts(config)


def test_a_kv_cache_size_that_holds_no_block_fails_the_start() -> None:
    config = EngineConfig(model="tiny-random", kv_cache_gib=1e-12)
    with pytest.raises(InvalidConfigError, match="kv_cache_gib=1e-12 holds no KV block"):
        build_engine_parts(config)


def test_running_out_of_device_memory_while_allocating_the_cache_is_typed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model_setup, "memory_bytes", lambda device: None)
    monkeypatch.setattr(KVCache, "__init__", out_of_memory)
    with pytest.raises(KVCacheTooLargeError, match="does not fit"):
        new_kv_cache(_tiny_arch(), 16, 16, torch.float32, torch.device("cpu"))


def test_the_cpu_allocators_failure_is_typed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # A limit the room check cannot see (RLIMIT_AS) fails torch's CPU allocator, which raises
    # a plain RuntimeError.
    def cannot_allocate(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(model_setup, "memory_bytes", lambda device: None)
    monkeypatch.setattr(KVCache, "__init__", cannot_allocate)
    with pytest.raises(KVCacheTooLargeError, match="does not fit"):
        new_kv_cache(_tiny_arch(), 16, 16, torch.float32, torch.device("cpu"))


def test_the_cpu_memory_is_known() -> None:
    room = device_module.memory_bytes(torch.device("cpu"))
    assert room is None or room > 2**20
    if sys.platform == "linux":
        # What is available now, which the pool must fit: never more than the machine has.
        assert room is not None and room <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_containers_memory_limit_bounds_the_room(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("3221225472\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert device_module._cgroup_room(str(tmp_path)) == 2 * 2**30
    # The weights just read sit in the page cache, counted as used: its inactive part is
    # given back before the limit refuses an allocation.
    (tmp_path / "memory.stat").write_text("anon 1000\ninactive_file 536870912\nactive_file 7\n")
    assert device_module._cgroup_room(str(tmp_path)) == 2 * 2**30 + 2**29
    (tmp_path / "memory.max").write_text("max\n")
    assert device_module._cgroup_room(str(tmp_path)) is None
    assert device_module._cgroup_room(str(tmp_path / "absent")) is None


def test_an_attention_backend_the_device_cannot_run_fails_the_start_typed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _isolate_registry(monkeypatch)
    register_backend("nowhere", sdpa_attention, lambda device: False, requirement="a TPU")
    config = EngineConfig(model="tiny-random", attention_backend="nowhere", num_blocks=16)
    with pytest.raises(InvalidConfigError, match="'nowhere' is not available on cpu: a TPU"):
        build_engine_parts(config)


def test_config_errors_are_value_errors_and_medha_errors() -> None:
    for error in (InvalidConfigError, DeviceUnavailableError, KVCacheTooLargeError):
        assert issubclass(error, ValueError) and issubclass(error, MedhaError)


def _tiny_arch() -> ModelArch:
    return load_checkpoint("tiny-random").arch


def _isolate_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register backends without leaving them behind for the others."""
    for name in ("_BACKENDS", "_AVAILABLE", "_NAMED_AVAILABLE", "_REQUIREMENT"):
        monkeypatch.setattr(attention, name, dict(getattr(attention, name)))
    monkeypatch.setattr(attention, "_PREFERENCE", list(attention._PREFERENCE))


@pytest.mark.parametrize("content", [None, "{}", "not json", '{"efficiency": 3}'])
def test_a_cost_profile_that_is_missing_or_not_a_profile_fails_the_start_typed(
    tmp_path: Path, content: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)

    def load_model(*args: object) -> None:
        raise AssertionError("the weights loaded before the profile was read")

    monkeypatch.setattr(engine_setup, "load_model", load_model)
    with pytest.raises(InvalidConfigError, match=r"profile\.json"):
        build_engine_parts(EngineConfig(model="tiny-random", cost_profile=path))


def test_a_cost_profile_calibrated_for_another_target_fails_the_start_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibrated = load_profile(cost_profile_path())
    target = calibration_target(_tiny_arch(), torch.float32, torch.device("cpu"))
    assert calibrated.calibrated_for == target  # what calibrate_runner records
    path = tmp_path / "profile.json"
    save_profile(dataclasses.replace(calibrated, calibrated_for="32x4096; bfloat16; cuda"), path)

    def load_model(*args: object) -> None:
        raise AssertionError("the weights loaded before the profile was checked")

    with monkeypatch.context() as patched:
        patched.setattr(engine_setup, "load_model", load_model)
        with pytest.raises(InvalidConfigError, match="was calibrated for '32x4096; bfloat16"):
            build_engine_parts(EngineConfig(model="tiny-random", cost_profile=path))
        # The same model in bf16 is another target too: bf16 products time differently.
        config = EngineConfig(
            model="tiny-random", dtype="bfloat16", cost_profile=cost_profile_path()
        )
        with pytest.raises(InvalidConfigError, match="float32; cpu"):
            build_engine_parts(config)
    # A datasheet profile (no target) and a matching one are taken.
    save_profile(dataclasses.replace(calibrated, calibrated_for=""), path)
    for profile in (path, cost_profile_path()):
        parts = build_engine_parts(
            EngineConfig(model="tiny-random", cost_profile=profile, num_blocks=16)
        )
        assert parts.calibration is None


def test_a_sliding_window_caps_the_default_and_the_largest_max_model_len() -> None:
    arch = dataclasses.replace(_tiny_arch(), sliding_window=64)
    assert max_model_len_for(EngineConfig(model="tiny-random"), arch) == 64
    assert max_model_len_for(EngineConfig(model="tiny-random", max_model_len=64), arch) == 64
    with pytest.raises(
        InvalidConfigError,
        match=r"\(max_position_embeddings=4096, capped by its sliding window of 64\)",
    ):
        max_model_len_for(EngineConfig(model="tiny-random", max_model_len=65), arch)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(parallel=ParallelConfig(tp=3)), "tp=3 must divide num_attention_heads=4"),
        (dict(parallel=ParallelConfig(pp=3)), "pp=3 exceeds the model's 2 layers"),
        (
            dict(parallel=ParallelConfig(tp=2), attention_backend="triton"),
            "attention backend 'triton' is not available on cpu",
        ),
        (
            dict(parallel=ParallelConfig(kvp=2, max_tokens_per_kvp_group=32), max_model_len=65),
            "max_model_len=65 exceeds what kvp=2 groups of max_tokens_per_kvp_group=32 hold",
        ),
    ],
)
def test_a_parallel_layout_that_cannot_work_fails_before_any_worker_starts(
    settings: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medha.parallel import engine_parts
    from medha.parallel.cluster import Cluster
    from tests.engine_support import cost_profile_path

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("workers were started")

    monkeypatch.setattr(Cluster, "start", no_workers)
    monkeypatch.delenv("TRITON_INTERPRET")  # the tests' own: Triton on CPU, interpreted
    # A saved profile: no calibration in this process, whose runner would refuse triton too.
    config = EngineConfig(
        model="tiny-random", num_blocks=16, cost_profile=cost_profile_path(), **settings
    )  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match=re.escape(message)):
        engine_parts.build_parallel_parts(config)


def test_lone_batch_time_is_off_unless_chosen_and_reaches_the_scheduler() -> None:
    assert build_scheduler_config(EngineConfig(model="tiny-random"), 64).lone_batch_time is None
    chosen = EngineConfig(model="tiny-random", lone_batch_time=0.5)
    assert build_scheduler_config(chosen, 64).lone_batch_time == 0.5
    with pytest.raises(pydantic.ValidationError):
        EngineConfig(model="tiny-random", lone_batch_time=0.0)
