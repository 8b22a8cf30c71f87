"""How long one Scheduler.schedule() call takes with 1,000 waiting and 128 decoding requests.

Run: .venv/bin/python benchmarks/scheduler_speed.py [--calls 2000] [--policy lars] [--cost NAME]
[--no-lead-guard]

Every measured call sees the same load: between calls (untimed) the issued plan completes,
requests the call started are aborted and replaced by fresh waiting ones, so the queue stays
at 1,000 waiting and 128 decoding. Prints p50/p99 per call for KVP 1 and 4. Target: p99 < 1 ms.
Last, the same percentiles of a loop that always does the same work (as long as the KVP 4
median): the machine's own spread, which no scheduler change removes.

--cost roofline (default): the real medha.perf model (Llama-3-8B on one H100 per KVP group),
which prices a growing batch incrementally (medha.scheduler.pricing).
--cost analytic: a toy additive cost model with an incremental pricer too, so the numbers are
nearly all the scheduler's own overhead.
--cost analytic-list: the toy model without a pricer: every chunk-size question re-prices the
whole group batch (pricing.ListPricer), as every cost model did before pricers existed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from medha.perf import H100_80GB, LLAMA_3_8B, ReplicaSpec, RooflineCostModel
from medha.scheduler import RequestStatus, Scheduler, SchedulerConfig, SeqShape
from medha.scheduler.cost import BatchCostModel


class AnalyticCost:
    """time = a + b * sum(q) + c * sum(q * (kv + q / 2)) + d * sum(kv), kv being the KV the
    group priced holds (SeqShape.kv_tokens)."""

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        total = 0.005
        for seq in seqs:
            total += self.seq_time(seq)
        return total

    @staticmethod
    def seq_time(seq: SeqShape) -> float:
        kv = seq.kv_tokens
        q = seq.q_tokens
        return 2e-5 * q + 1.6e-9 * q * (kv + q / 2) + 1e-8 * kv

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.batch_time(seqs)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.remaining_prefill_time(0, prompt_tokens)

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        left = prompt_tokens - processed_tokens
        attention = (prompt_tokens**2 - processed_tokens**2) / 2
        return 0.005 + 2e-5 * left + 1.6e-9 * attention if left > 0 else 0.0


class IncrementalAnalyticCost(AnalyticCost):
    """AnalyticCost plus a pricer: the model is additive, so a batch is its running total."""

    def batch_pricer(self) -> AnalyticPricer:
        return AnalyticPricer()


class AnalyticPricer:
    def __init__(self) -> None:
        self.total = 0.005
        self.empty = True

    def add(self, seq: SeqShape) -> None:
        self.total += AnalyticCost.seq_time(seq)
        self.empty = False

    def add_decodes(self, kv_tokens: Sequence[int], heads: bool = True) -> None:
        rows = 1 if heads else 0
        for kv in kv_tokens:
            self.add(SeqShape(1, kv, 1, rows))

    def time(self) -> float:
        return 0.0 if self.empty else self.total

    def stage_time(self) -> float:
        return self.time()

    def time_with(self, seq: SeqShape) -> float:
        return self.total + AnalyticCost.seq_time(seq)


def cost_model(name: str, kvp: int) -> BatchCostModel:
    if name == "analytic":
        return IncrementalAnalyticCost()
    if name == "analytic-list":
        return AnalyticCost()
    # Requests live on one group here (no KVP split), so the shard size only sizes the table.
    return RooflineCostModel(
        LLAMA_3_8B, H100_80GB, ReplicaSpec(kvp=kvp, kvp_max_tokens_per_group=1 << 20)
    )


def build(
    policy: str,
    kvp: int,
    waiting: int,
    decoding: int,
    rng: random.Random,
    cost: BatchCostModel,
    lead_guard: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        policy=policy,  # type: ignore[arg-type]
        lead_guard=lead_guard,
        kvp_groups=kvp,
        num_blocks=400_000 // kvp,
        max_batch_size=256,
        target_batch_time=0.05,
    )
    scheduler = Scheduler(config, cost)
    now = 0.0
    for index in range(decoding):
        scheduler.add_request(f"d{index}", rng.randint(100, 8000), 1_000_000, now)
    while any(r.status is not RequestStatus.DECODING for r in scheduler.table.running.values()) or (
        scheduler.stats().decoding < decoding
    ):
        plan = scheduler.schedule(now)
        now += plan.predicted_time
        scheduler.on_step_done(plan, now)
    for index in range(waiting):
        arrival = now - rng.uniform(0, 5)
        deadline = rng.choice([None, 0.5, 2.0])
        scheduler.add_request(f"w{index}", rng.randint(50, 20_000), 256, arrival, deadline)
    return scheduler


def measure(
    policy: str,
    kvp: int,
    calls: int,
    seed: int = 0,
    cost: str = "roofline",
    lead_guard: bool = True,
) -> list[float]:
    rng = random.Random(seed)
    scheduler = build(policy, kvp, 1000, 128, rng, cost_model(cost, kvp), lead_guard)
    now = 10.0
    samples = []
    fresh = 0
    for _ in range(calls):
        start = time.perf_counter()
        plan = scheduler.schedule(now)
        samples.append(time.perf_counter() - start)
        now += plan.predicted_time
        scheduler.on_step_done(plan, now)
        for seq in plan.prefills:
            scheduler.abort(seq.request_id)
            scheduler.add_request(f"f{fresh}", rng.randint(50, 20_000), 256, now)
            fresh += 1
    return samples


def constant_work(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def machine_jitter(seconds: float, calls: int) -> tuple[float, float]:
    """p50 and p99 of a pure-Python loop that always does the same work, sized to take about
    `seconds`: the spread this machine adds to any timing (VM scheduling, caches, frequency),
    to read the scheduler's p99 against."""
    iterations = 1000
    while True:
        start = time.perf_counter()
        constant_work(iterations)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        iterations *= 2
    iterations = max(1, int(iterations * seconds / elapsed))
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        constant_work(iterations)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--policy", default="lars")
    parser.add_argument(
        "--cost", default="roofline", choices=["roofline", "analytic", "analytic-list"]
    )
    parser.add_argument(
        "--no-lead-guard", action="store_true", help="SchedulerConfig.lead_guard=False"
    )
    args = parser.parse_args()
    for kvp in (1, 4):
        samples = sorted(
            measure(args.policy, kvp, args.calls, cost=args.cost, lead_guard=not args.no_lead_guard)
        )
        p50 = statistics.median(samples) * 1e3
        p99 = samples[int(0.99 * (len(samples) - 1))] * 1e3
        print(
            f"policy={args.policy} cost={args.cost} lead_guard={not args.no_lead_guard} kvp={kvp}: "
            f"p50 {p50:.3f} ms  p99 {p99:.3f} ms per call"
        )
    still_p50, still_p99 = machine_jitter(p50 / 1e3, args.calls)
    print(
        f"machine jitter, constant work of the same size: p50 {still_p50 * 1e3:.3f} ms  "
        f"p99 {still_p99 * 1e3:.3f} ms (p99/p50 {still_p99 / still_p50:.2f})"
    )


if __name__ == "__main__":
    main()
