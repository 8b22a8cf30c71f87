"""How long one Scheduler.schedule() call takes with 1,000 waiting and 128 decoding requests.

Run: .venv/bin/python benchmarks/scheduler_speed.py [--calls 2000] [--policy lars]

Every measured call sees the same load: between calls (untimed) the issued plan completes,
requests the call started are aborted and replaced by fresh waiting ones, so the queue stays
at 1,000 waiting and 128 decoding. Prints p50/p99 per call for KVP 1 and 4. Target: p99 < 1 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from medha.scheduler import RequestStatus, Scheduler, SchedulerConfig, SeqShape


class AnalyticCost:
    """time = a + b * sum(q) + c * sum(q * (kv / n + q / 2)) + d * sum(kv / n)."""

    def batch_time(self, seqs: Sequence[SeqShape]) -> float:
        total = 0.005
        for seq in seqs:
            kv = seq.kv_tokens / seq.kvp_groups
            total += 2e-5 * seq.q_tokens + 1.6e-9 * seq.q_tokens * (kv + seq.q_tokens / 2)
            total += 1e-8 * kv
        return total

    def stage_time(self, seqs: Sequence[SeqShape]) -> float:
        return self.batch_time(seqs)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.remaining_prefill_time(0, prompt_tokens)

    def remaining_prefill_time(self, processed_tokens: int, prompt_tokens: int) -> float:
        left = prompt_tokens - processed_tokens
        attention = (prompt_tokens**2 - processed_tokens**2) / 2
        return 0.005 + 2e-5 * left + 1.6e-9 * attention if left > 0 else 0.0


def build(policy: str, kvp: int, waiting: int, decoding: int, rng: random.Random) -> Scheduler:
    config = SchedulerConfig(
        policy=policy,  # type: ignore[arg-type]
        kvp_groups=kvp,
        num_blocks=400_000 // kvp,
        max_batch_size=256,
        target_batch_time=0.05,
    )
    scheduler = Scheduler(config, AnalyticCost())
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


def measure(policy: str, kvp: int, calls: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    scheduler = build(policy, kvp, waiting=1000, decoding=128, rng=rng)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--policy", default="lars")
    args = parser.parse_args()
    for kvp in (1, 4):
        samples = sorted(measure(args.policy, kvp, args.calls))
        p50 = statistics.median(samples) * 1e3
        p99 = samples[int(0.99 * (len(samples) - 1))] * 1e3
        print(f"policy={args.policy} kvp={kvp}: p50 {p50:.3f} ms  p99 {p99:.3f} ms per call")


if __name__ == "__main__":
    main()
