"""The simulated hardware: what a deployment is, how much KV it holds, how a pipeline runs plans.

A `Deployment` is `num_replicas` copies of one model replica of TP x PP x KVP GPUs. Its cost
model is medha.perf's roofline model, the same one the scheduler uses to size chunks, so the
simulated executor runs every batch in exactly the predicted time (`PipelineExecutor`); pass a
different `executor_cost` to the Simulator to study mispredictions (`plan_times` re-prices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medha.model.arch import ModelArch
from medha.perf import ChunkBudget, ReplicaSpec, RooflineCostModel
from medha.perf.hardware import DeviceProfile
from medha.scheduler import BatchPlan, SchedulerConfig
from medha.scheduler.cost import BatchCostModel

HARDWARE_NAMES: dict[str, str] = {"a100": "a100-80gb", "h100": "h100-80gb", "h200": "h200"}
"""Short CLI names of the built-in GPU profiles."""


@dataclass(frozen=True)
class Deployment:
    """`num_replicas` replicas of `arch` on `device`, each shaped `replica` (TP x PP x KVP)."""

    arch: ModelArch
    device: DeviceProfile
    replica: ReplicaSpec
    num_replicas: int = 1
    kv_memory_fraction: float = 0.9
    """Share of each GPU's memory for weights + KV cache (the rest: activations, workspace)."""
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    @property
    def num_gpus(self) -> int:
        return self.replica.world_size * self.num_replicas

    def cost_model(self, prefill_chunking: ChunkBudget | None = None) -> RooflineCostModel:
        """The deployment's cost model; `prefill_chunking`: the scheduler's chunk budget, which
        sets predicted prefill times (pass `ChunkBudget.of(scheduler_config)`)."""
        return RooflineCostModel(
            self.arch,
            self.device,
            self.replica,
            dtype_bytes=self.dtype_bytes,
            prefill_chunking=prefill_chunking,
        )

    def kv_tokens_per_group(self) -> int:
        """KV tokens one KVP group (a full TP x PP model copy) holds: the tightest stage's free
        memory after its weights, over its KV bytes per token."""
        arch, replica, d = self.arch, self.replica, self.dtype_bytes
        q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        per_layer = (
            arch.hidden_size * (q_dim + 2 * kv_dim)
            + q_dim * arch.hidden_size
            + 3 * arch.hidden_size * arch.intermediate_size
        )
        embedding = arch.vocab_size * arch.hidden_size
        kv_heads_per_gpu = max(1, arch.num_kv_heads // replica.tp)
        stages = replica.layers_per_stage(arch.num_layers)
        tokens = []
        for stage, layers in enumerate(stages):
            params = layers * per_layer
            if stage == 0:
                params += embedding
            if stage == len(stages) - 1 and not (arch.tie_word_embeddings and len(stages) == 1):
                params += embedding
            free = self.device.hbm_bytes * self.kv_memory_fraction - params * d / replica.tp
            per_token = 2 * layers * kv_heads_per_gpu * arch.head_dim * d
            tokens.append(int(free // per_token))
        if min(tokens) < 1:
            raise ValueError(
                f"{arch.num_layers}-layer model does not fit {self.device.name} GPUs as "
                f"TP{replica.tp} x PP{replica.pp}: no memory left for the KV cache"
            )
        return min(tokens)

    def scheduler_config(self, **settings: Any) -> SchedulerConfig:
        """A SchedulerConfig for one replica: KVP groups, pipeline stages and KV blocks from the
        deployment; everything else (policy, target_batch_time, ...) from `settings`."""
        block_size = int(settings.get("block_size", SchedulerConfig().block_size))
        return SchedulerConfig(
            kvp_groups=self.replica.kvp,
            max_tokens_per_kvp_group=self.replica.kvp_max_tokens_per_group
            if self.replica.kvp > 1
            else None,
            pp_stages=self.replica.pp,
            num_blocks=self.kv_tokens_per_group() // block_size,
            **settings,
        )

    def describe(self) -> dict[str, Any]:
        replica = self.replica
        return {
            "model_layers": self.arch.num_layers,
            "hidden_size": self.arch.hidden_size,
            "hardware": self.device.name,
            "tp": replica.tp,
            "pp": replica.pp,
            "kvp": replica.kvp,
            "max_tokens_per_kvp_group": replica.kvp_max_tokens_per_group,
            "replicas": self.num_replicas,
            "gpus": self.num_gpus,
            "kv_tokens_per_group": self.kv_tokens_per_group(),
        }


class PipelineExecutor:
    """The timing of one replica's pipeline of `pp` stages.

    A plan holds each stage for its stage time (the slowest stage's, as the cost model reports
    it: what bounds the rate at which micro-batches follow each other), and moves from stage to
    stage at its mean per-stage time, batch_time / pp, so that a plan alone in the pipeline
    finishes exactly `batch_time` after issue, as the cost model predicts (uneven stages are
    not each slowest). Each stage serves plans in issue order and the last stage finishes them in
    issue order. Stage 0 is free again after the plan's stage time: with SPP the next
    micro-batch enters then.
    """

    def __init__(self, pp_stages: int) -> None:
        self._stage_free = [0.0] * pp_stages
        self._last_done = 0.0
        self.busy_time = 0.0
        """Seconds stage 0 has been occupied (utilisation = busy_time / elapsed)."""

    def issue(self, now: float, stage_time: float, batch_time: float) -> tuple[float, float]:
        """Run a plan issued at `now`: (time it leaves stage 0, time it finishes)."""
        hop = batch_time / len(self._stage_free)
        enter = now
        stage0_done = now
        for stage, free in enumerate(self._stage_free):
            enter = max(enter, free)
            self._stage_free[stage] = enter + stage_time
            if stage == 0:
                stage0_done = enter + stage_time
            enter += hop
        done = max(enter, now + batch_time, self._last_done)
        self._last_done = done
        self.busy_time += stage0_done - now
        return stage0_done, done


def plan_times(plan: BatchPlan, cost: BatchCostModel) -> tuple[float, float]:
    """(stage time, batch time) of `plan` under `cost`: every KVP group runs the sequences
    with KV on it, each reading its own shard, and the step lasts as long as the slowest group
    (as the scheduler prices)."""
    busy = list(plan.group_shapes().values())
    batch = max(cost.batch_time(shapes) for shapes in busy)
    stage = max(cost.stage_time(shapes) for shapes in busy)
    return stage, batch
