"""Reporting simulation results: one table (rich) and the same numbers as JSON.

Table columns: TTFT p50/p90/p99 and E2E p50/p99 in seconds, TPOT p50/p90/p99 in
milliseconds, throughput in requests and tokens (prompt + output) per second, and deadline
attainment in percent. The JSON holds, per policy spec, the summary over all requests and per
workload label ("short", "long", ...), plus counts (rejected, plans, preemptions) and how long
the simulation took.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medha.sim.metrics import MetricsSummary
from medha.sim.runs import PolicyRun

COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    # (header, MetricsSummary field, scale, format)
    ("TTFT s\np50", "ttft_p50", 1.0, "{:.3g}"),
    ("TTFT s\np90", "ttft_p90", 1.0, "{:.3g}"),
    ("TTFT s\np99", "ttft_p99", 1.0, "{:.3g}"),
    ("TPOT ms\np50", "tpot_p50", 1e3, "{:.3g}"),
    ("TPOT ms\np90", "tpot_p90", 1e3, "{:.3g}"),
    ("TPOT ms\np99", "tpot_p99", 1e3, "{:.3g}"),
    ("E2E s\np50", "e2e_p50", 1.0, "{:.3g}"),
    ("E2E s\np99", "e2e_p99", 1.0, "{:.3g}"),
    ("req/s", "throughput_rps", 1.0, "{:.3g}"),
    ("tok/s", "throughput_tokens_per_s", 1.0, "{:.0f}"),
    ("deadline\nmet %", "deadline_attainment", 100.0, "{:.1f}"),
)
"""(header, MetricsSummary field, scale, format) of each column after policy and count."""

TABLE_WIDTH = 150
"""Columns of the table when stdout is not a terminal (rich would default to 80 and elide)."""


def format_value(value: float, scale: float, fmt: str) -> str:
    return "-" if math.isnan(value) else fmt.format(value * scale)


def summary_cells(summary: MetricsSummary) -> list[str]:
    return [format_value(getattr(summary, field), scale, fmt) for _, field, scale, fmt in COLUMNS]


def results_table(runs: Sequence[PolicyRun], title: str = "", label: str | None = None) -> Table:
    """One row per policy spec: the summary over all requests, or over those with `label`."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("policy", no_wrap=True)
    table.add_column("done", justify="right")
    for header, *_ in COLUMNS:
        table.add_column(header, justify="right")
    for run in runs:
        summary = run.result.summary(label)
        done = str(summary.requests)
        if rejected := run.result.rejected_count(label):
            done += f" (+{rejected} rejected)"
        table.add_row(run.spec, done, *summary_cells(summary))
    return table


def print_results(
    runs: Sequence[PolicyRun], title: str = "", console: Console | None = None
) -> None:
    """The table over all requests, then one per workload label when there are several."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=TABLE_WIDTH)
    console.print(results_table(runs, title))
    labels = sorted({label for run in runs for label in run.result.labels})
    if len(labels) > 1:
        for label in labels:
            console.print(results_table(runs, f"{label} requests only", label))


def results_json(setup: Mapping[str, Any], runs: Sequence[PolicyRun]) -> dict[str, Any]:
    """Setup plus, per policy spec, the numbers of the table (all and per label)."""
    policies = {}
    for run in runs:
        result = run.result
        policies[run.spec] = {
            "all": result.summary().to_dict(),
            "by_label": {label: result.summary(label).to_dict() for label in result.labels},
            "rejected": len(result.rejected),
            "rejected_by_label": {label: result.rejected_count(label) for label in result.labels},
            "plans": result.plans,
            "simulated_seconds": result.end_time,
            "wall_seconds": round(result.wall_seconds, 3),
        }
    return {"setup": dict(setup), "policies": policies}


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
