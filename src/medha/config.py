"""EngineConfig: everything an Engine is built from, validated once (pydantic v2, frozen).

Construction does no I/O: the model is opened when the engine starts, so a config can be built,
validated and passed around (or serialised) anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medha.scheduler import PolicyName
from medha.scheduler.config import CHUNK_MULTIPLE

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "reference")
"""Every attention backend medha registers (medha.kernels), whether or not this machine can run
it: that is checked when the engine starts, on its device."""


def _not_a_bool(value: object) -> object:
    """Refuse True/False where a count goes: pydantic would take them as 1 and 0 (a flag
    passed in the wrong place), as SamplingParams refuses them too."""
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value}")
    return value


class ParallelConfig(BaseModel):
    """How one model replica spreads over processes (docs/parallelism.md).

    world = tp x pp x kvp worker processes; with world 1 and no `attach` (the default) the
    engine runs embedded in the caller's process. See docs/parallelism.md.
    """

    # allow_inf_nan=False: an infinite timeout overflows timedelta when the workers start.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tp: int = Field(default=1, ge=1)
    """Tensor parallelism: heads and MLP columns split over tp ranks (one node)."""
    pp: int = Field(default=1, ge=1)
    """Pipeline stages, each holding a contiguous range of layers."""
    kvp: int = Field(default=1, ge=1)
    """KV-cache parallel groups: a long request's KV is split along the sequence over them; a
    request within one group's share lives on one group, so the groups also serve short
    requests side by side (data-parallel replicas)."""
    max_tokens_per_kvp_group: int | None = Field(default=None, ge=1)
    """M: a request's tokens [0, M) live on its first KVP group, [M, 2M) on the next. None: a
    request never spreads, and kvp > 1 groups are data-parallel replicas only."""
    spp: bool = True
    """Stream pipeline parallelism: a prompt's next chunk enters stage 0 as soon as the previous
    one left it (pp > 1 only)."""

    attach: str | None = None
    """HOST:PORT where the engine waits for workers started by torchrun on one or more nodes
    (`torchrun ... --no-python medha worker --engine HOST:PORT`); None: the engine spawns its
    workers on this machine. See docs/parallelism.md."""

    timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for the workers to start (load their shards) and for any one step or
    control message; a worker that takes longer is a failure (EngineFailedError)."""

    _counts_are_not_bools = field_validator(
        "tp", "pp", "kvp", "max_tokens_per_kvp_group", mode="before"
    )(_not_a_bool)

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.attach is not None:
            host, _, port = self.attach.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"attach must be HOST:PORT, got {self.attach!r}")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.kvp

    @property
    def uses_workers(self) -> bool:
        """The model runs in worker processes (else embedded in the engine's process)."""
        return self.world_size > 1 or self.attach is not None


class EngineConfig(BaseModel):
    """How to run a model. Bad values raise pydantic's ValidationError, naming the field."""

    # allow_inf_nan=False: every float here is a size or a time that must be finite (an infinite
    # kv_cache_gib or calibration budget would only fail, or never end, once the engine starts).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str
    """A preset ("smollm2-135m", "tiny-random"), an HF checkpoint folder or a .gguf file."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    """A torch device ("cpu", "cuda", "cuda:1"); one this machine cannot use is refused when the
    engine starts (medha.errors.DeviceUnavailableError)."""
    attention_backend: str = "auto"
    """"auto" picks the best available on the device (logged); or "triton", "sdpa", "reference"
    (or a backend registered with medha.kernels.register_backend)."""

    # -- scheduling ---------------------------------------------------------------------------
    policy: PolicyName = "lars"
    """fcfs (no chunking: the convoy baseline), fcfs-chunked, edf, srpt, lrs or lars."""
    target_batch_time: float = Field(default=0.05, gt=0)
    """Seconds per iteration the adaptive chunking aims at (the decode latency budget)."""
    finish_tolerance: float = Field(default=0.25, ge=0, lt=1)
    """How far over target_batch_time an iteration may go when that completes a prompt (its
    first token then comes one iteration sooner); 0 keeps every iteration within +-10%."""
    deadline_factor: float = Field(default=1.5, gt=0)
    min_deadline: float = Field(default=0.5, gt=0)
    """A request given no deadline gets max(deadline_factor x its predicted prefill time,
    min_deadline) seconds to its first token. LARS ranks by slack relative to the deadline, so
    a prompt far quicker than min_deadline may wait for other work while it still meets it
    (a 24-token chat, 0.07 s alone on a 2-core CPU, had 0.4 s of slack): lower min_deadline
    when slowdown, not the deadline, is what counts."""
    lead_guard: bool = True
    """Under LARS, a started prefill keeps the lead over a request ranked ahead of it while
    going first serves the pair better: two chats that arrive together go one after the other
    instead of taking turns chunk by chunk, so the first one's TTFT is not doubled
    (docs/scheduler.md, "The lead guard"). False: plain LARS, for comparison. The other
    policies ignore it."""
    max_chunk: int = Field(default=8192, ge=CHUNK_MULTIPLE, multiple_of=CHUNK_MULTIPLE)
    """Largest prefill chunk in tokens: a multiple of 32, the granularity chunks are cut at."""
    fixed_chunk: int = Field(default=512, ge=1)
    """Per-iteration token budget of the fcfs-chunked baseline."""
    pause_iterations: bool | None = None
    """Let an iteration stop between layers when a request arrives that the policy ranks ahead
    of the iteration's prefills: its decodes finish at once, the newcomer's prefill runs, then
    its prefill chunks carry on where they stopped, nothing recomputed (docs/engine.md,
    "Pausing an iteration for a newer request"). None: on when the model runs on a CPU, where
    one iteration over a long prompt takes hundreds of ms; off elsewhere (a GPU's iterations
    are short, and its host runs ahead of its kernels: a pause that stops the GPU's work
    between layers would need a synchronization per layer). Single-process engine only: True
    with worker processes (parallel world > 1, or attach) is refused."""
    lone_batch_time: float | None = Field(default=None, gt=0)
    """Seconds an iteration may take when it runs one prefill and the engine holds no other
    request (None: target_batch_time). No decode's latency is at stake then, and small chunks
    only repeat each iteration's fixed costs: on a 2-core CPU, 0.5 prefills a lone
    4,000-token prompt 1.6x faster (SmolLM2-135M, whose 32-token chunks already overrun the
    default budget). A request that arrives meanwhile stops such an iteration at its next layer
    where iterations pause (pause_iterations), whatever it ranks. Off by default: on the mixed
    chat workload of benchmarks/mixed_cpu.py it lowered every TTFT, but it speeds up a chat
    alone more than one in the mix, so the chats' slowdowns rose (docs/engine.md, "A prefill
    alone")."""
    max_num_seqs: int = Field(default=256, ge=1)
    """Most requests running (prefilling or decoding) at once."""

    # -- memory -------------------------------------------------------------------------------
    block_size: int = Field(default=16, ge=1)
    num_blocks: int | None = Field(default=None, ge=1)
    """KV cache blocks; None sizes the cache from kv_cache_gib."""
    kv_cache_gib: float = Field(default=1.0, gt=0)
    """KV cache size when num_blocks is None; one larger than the device's memory is refused
    when the engine starts (medha.errors.KVCacheTooLargeError)."""
    enable_metrics: bool = True
    """Record Prometheus metrics (`Engine.metrics`, the server's /metrics): about 3 us of the
    event loop's time per token, which off saves (vLLM's `disable_log_stats`)."""
    enable_prefix_caching: bool = True
    """Keep the KV of computed full blocks (of prompts and of outputs), by the hash of their
    tokens, and let a later request that starts with the same tokens (a conversation's next
    turn, another question about the same document) take them instead of computing them
    (vLLM's automatic prefix caching). Cached blocks nobody uses count as free: they are
    evicted when memory is needed, least recently used first (docs/engine.md, "Prefix
    caching")."""
    generation_config: str = "auto"
    """Where requests' sampling defaults come from, as vLLM's `--generation-config`: "auto",
    the model's generation_config.json (its temperature, top_p, top_k, min_p and
    repetition_penalty, for a request that gives no SamplingParams or, on the server, leaves
    those fields out; medha.model.generation_defaults); "vllm", SamplingParams' own defaults;
    or a folder holding a generation_config.json to take them from."""
    max_model_len: int | None = Field(default=None, ge=1)
    """Longest prompt + output accepted; None: the model's max_position_embeddings, capped by
    its sliding window if it has one (and with KVP by kvp x max_tokens_per_kvp_group). Beyond
    the model's context (ModelArch.context_len) it is refused when the engine starts
    (medha.errors.InvalidConfigError), as vLLM does."""

    # -- cost model ---------------------------------------------------------------------------
    cost_profile: Path | None = None
    """A device profile saved by `medha calibrate`; None: a short calibration at start."""
    calibration_seconds: float = Field(default=3.0, gt=0)
    """Time budget of the start-up calibration (when no cost_profile is given)."""
    online_time_scale: bool = True
    """Rescale the cost model's batch times from measured iterations as the engine runs
    (medha.perf.OnlineTimeScale): the executor's speed drifts after calibration. With worker
    processes it learns per pipeline stage; off: predictions stay exactly as calibrated."""

    # -- parallelism --------------------------------------------------------------------------
    parallel: ParallelConfig = ParallelConfig()
    """TP x PP x KVP; world > 1 runs the model in that many worker processes."""

    _counts_are_not_bools = field_validator(
        "max_chunk",
        "fixed_chunk",
        "max_num_seqs",
        "block_size",
        "num_blocks",
        "max_model_len",
        mode="before",
    )(_not_a_bool)

    @property
    def pauses_iterations(self) -> bool:
        """Whether an iteration may stop between layers (pause_iterations, resolved)."""
        if self.pause_iterations is not None:
            return self.pause_iterations
        on_cpu = self.device.partition(":")[0] == "cpu"
        return on_cpu and not self.parallel.uses_workers

    @model_validator(mode="after")
    def _check_combinations(self) -> EngineConfig:
        if self.pause_iterations and self.parallel.uses_workers:
            raise ValueError(
                "pause_iterations=True needs the single-process engine (parallel world 1, no "
                "attach): worker processes run every iteration through"
            )
        limit = self.parallel.max_tokens_per_kvp_group
        if limit is not None and limit % self.block_size:
            raise ValueError(
                f"parallel.max_tokens_per_kvp_group ({limit}) must be a multiple of block_size "
                f"({self.block_size}), so that no KV block spans two KVP groups"
            )
        return self

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name in ATTENTION_BACKENDS:
            return name
        # A backend registered at run time is accepted too. Look it up only if the registry is
        # already imported: whoever registered one has imported it, and importing it here would
        # pull torch into building a config.
        registry = sys.modules.get("medha.kernels.attention")
        if registry is not None and name in registry.backend_names():
            return name
        raise ValueError(
            f"unknown attention backend {name!r} (choose from {', '.join(ATTENTION_BACKENDS)})"
        )
