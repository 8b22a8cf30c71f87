"""Running several scheduling policies on one workload and one deployment.

A policy spec is a policy name (medha.scheduler.POLICY_NAMES), optionally with a fixed chunk
size for `fcfs-chunked`: "fcfs-chunked:2048" (Sarathi with 2048-token chunks). Every spec runs
on the identical request list, each with fresh schedulers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medha.perf import ChunkBudget, RooflineCostModel
from medha.scheduler import POLICY_NAMES
from medha.sim.replica import Deployment
from medha.sim.simulator import LONG_PROMPT_TOKENS, Routing, SimResult, Simulator
from medha.sim.workload import SimRequest


@dataclass(frozen=True)
class PolicyRun:
    """One policy spec's result on a workload."""

    spec: str
    result: SimResult


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """("fcfs-chunked", {"fixed_chunk": 2048}) for "fcfs-chunked:2048"; ("lars", {}) for "lars".

    Raises ValueError naming the known policies.
    """
    name, _, chunk = spec.strip().partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    if not chunk:
        return name, {}
    if name != "fcfs-chunked":
        raise ValueError(f"only fcfs-chunked takes a chunk size ({spec!r})")
    if not chunk.isdigit() or int(chunk) < 1:
        raise ValueError(f"chunk size in {spec!r} must be a positive integer")
    return name, {"fixed_chunk": int(chunk)}


def parse_policies(text: str) -> list[str]:
    """Comma-separated policy specs, validated, duplicates dropped (order kept)."""
    specs = [spec.strip() for spec in text.split(",") if spec.strip()]
    if not specs:
        raise ValueError("no policy given")
    for spec in specs:
        parse_policy(spec)
    return list(dict.fromkeys(specs))


def run_policies(
    deployment: Deployment,
    specs: Sequence[str],
    requests: Sequence[SimRequest],
    *,
    scheduler_settings: Mapping[str, Any] | None = None,
    routing: Routing = "round-robin",
    trace_chunks_from: int = LONG_PROMPT_TOKENS,
) -> list[PolicyRun]:
    """Simulate `requests` under every policy spec on `deployment` (one shared cost model).

    `scheduler_settings`: SchedulerConfig fields for every run (target_batch_time, spp, ...);
    a spec's own chunk size overrides `fixed_chunk`.
    """
    costs: dict[ChunkBudget, RooflineCostModel] = {}
    runs = []
    for spec in specs:
        name, overrides = parse_policy(spec)
        settings = {**(scheduler_settings or {}), "policy": name, **overrides}
        config = deployment.scheduler_config(**settings)
        # Policies with the same chunk budget share a cost model, and so its prefill table:
        # identical requests get identical default deadlines under every policy.
        budget = ChunkBudget.of(config)
        if budget not in costs:
            costs[budget] = deployment.cost_model(budget)
        simulator = Simulator(
            config,
            costs[budget],
            num_replicas=deployment.num_replicas,
            routing=routing,
            trace_chunks_from=trace_chunks_from,
        )
        runs.append(PolicyRun(spec, simulator.run(requests)))
    return runs
