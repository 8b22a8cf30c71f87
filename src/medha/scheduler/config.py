"""SchedulerConfig: every knob of the pure scheduler, validated once, frozen.

The defaults follow the Medha paper's design: 32-token chunk granularity up to 8192, +-10%
tolerance around the per-iteration time budget, 16-token KV blocks, 256K tokens before a prefill
counts as "long".
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CHUNK_MULTIPLE = 32
"""Prefill chunks are cut at multiples of this many tokens by default (and always by the
engine: EngineConfig.max_chunk must be one)."""

PolicyName = Literal["fcfs", "fcfs-chunked", "edf", "srpt", "lrs", "lars"]
POLICY_NAMES: tuple[PolicyName, ...] = ("fcfs", "fcfs-chunked", "edf", "srpt", "lrs", "lars")


class SchedulerConfig(BaseModel):
    """What the scheduler may put in one iteration and how much KV memory it manages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: PolicyName = "lars"
    """Priority and chunking policy: see docs/scheduler.md."""
    target_batch_time: float = Field(default=0.05, gt=0)
    """Per-iteration time budget in seconds (the decode latency SLO)."""
    lone_batch_time: float | None = Field(default=None, gt=0)
    """Budget of an iteration that runs one prefill while the scheduler holds no other request
    (None: target_batch_time). No decode's latency is at stake then, and small chunks only
    repeat each iteration's fixed costs; for an executor that a newcomer can pause between
    layers, or where prompts come one at a time."""
    min_chunk: int = Field(default=32, ge=1)
    max_chunk: int = Field(default=8192, ge=1)
    chunk_multiple: int = Field(default=CHUNK_MULTIPLE, ge=1)
    chunk_tolerance: float = Field(default=0.10, ge=0, lt=1)
    """A chunk is accepted when the batch's predicted time is within target x (1 +- tolerance)."""
    finish_tolerance: float = Field(default=0.25, ge=0, lt=1)
    """A chunk that completes its prompt may take the batch up to target x (1 + this): the
    prompt's first token comes one iteration sooner, rather than a small tail paying a whole
    iteration's fixed cost (weights read, per-step overhead) later. A value below
    chunk_tolerance acts as chunk_tolerance."""
    max_batch_size: int = Field(default=256, ge=1)
    """Most sequences (decodes + prefills) in one batch; also caps the running requests."""
    fixed_chunk: int = Field(default=512, ge=1)
    """Token budget per iteration for `fcfs-chunked` (Sarathi-style)."""
    block_size: int = Field(default=16, ge=1)
    num_blocks: int = Field(default=4096, ge=1)
    """KV blocks per KVP group."""
    kvp_groups: int = Field(default=1, ge=1)
    max_tokens_per_kvp_group: int | None = Field(default=None, ge=1)
    """M: a request's tokens [0, M) live on its first group, [M, 2M) on the next... None: one
    group holds a whole request (groups then act as data-parallel replicas)."""
    pp_stages: int = Field(default=1, ge=1)
    spp: bool = True
    """Stream pipeline parallelism: a prompt's next chunk enters stage 0 once its previous chunk
    has left stage 0 (only matters when pp_stages > 1)."""
    long_prefill_threshold: int = Field(default=262_144, ge=1)
    """Processed tokens from which a prefill is "long" (space sharing, one per KVP group set)."""
    check_blocks: bool = Field(default_factory=lambda: os.environ.get("MEDHA_CHECK_BLOCKS") == "1")
    """Verify every freed KV block id (a debugging aid; it costs a set update per block, most
    of a scheduling call when a long prompt starts). Default: on when MEDHA_CHECK_BLOCKS=1, as
    the test suite sets it."""
    deadline_factor: float = Field(default=1.5, gt=0)
    min_deadline: float = Field(default=0.5, gt=0)
    """Default TTFT deadline: max(deadline_factor x predicted prefill time, min_deadline)."""
    pause_budget: int = Field(default=8, ge=0)
    """Most plans issued while a plan is paused, over all its pauses (Scheduler.pause_time): a
    bound on how long its prefill chunks wait, on top of the policy's own ranking (a paused
    plan resumes as soon as nothing newer ranks ahead of it). 0: never pause."""
    lead_guard: bool = True
    """LARS only: a started prefill keeps the lead over a request ranked ahead of it while
    that serves the pair better (medha.scheduler.lead_guard), so two chats that arrive
    together go one after the other rather than taking turns chunk by chunk. The baseline
    policies ignore it."""
    rank_ahead: bool = True
    """Rank prefills by their priority at the next decision, not at this one: a request left
    out of this batch cannot start before the next batch is planned, target_batch_time from now
    (with pipeline stages, target_batch_time / pp_stages: when this micro-batch leaves stage 0).
    For LARS this moves a request with a short deadline d ahead of a long one by lookahead / d
    (see docs/scheduler.md); for the other policies, whose keys share one rate of change, the
    order is the same either way."""

    @model_validator(mode="after")
    def _check_consistency(self) -> SchedulerConfig:
        if self.min_chunk > self.max_chunk:
            raise ValueError(f"min_chunk ({self.min_chunk}) exceeds max_chunk ({self.max_chunk})")
        if self.min_chunk % self.chunk_multiple or self.max_chunk % self.chunk_multiple:
            raise ValueError(
                f"min_chunk ({self.min_chunk}) and max_chunk ({self.max_chunk}) must be "
                f"multiples of chunk_multiple ({self.chunk_multiple})"
            )
        limit = self.max_tokens_per_kvp_group
        if limit is not None and limit % self.block_size:
            raise ValueError(
                f"max_tokens_per_kvp_group ({limit}) must be a multiple of block_size "
                f"({self.block_size}) so that no KV block spans two KVP groups"
            )
        return self

    @property
    def pipelined(self) -> bool:
        """True when consecutive chunks of one prompt may be in flight at the same time."""
        return self.spp and self.pp_stages > 1

    @property
    def lone_budget_fraction(self) -> float:
        """A lone prefill's budget over target_batch_time (lone_batch_time)."""
        if self.lone_batch_time is None:
            return 1.0
        return self.lone_batch_time / self.target_batch_time

    @property
    def total_blocks(self) -> int:
        return self.num_blocks * self.kvp_groups
