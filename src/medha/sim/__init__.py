"""Discrete-event simulator: the real Scheduler driven by the cost model on a simulated clock.

See docs/simulator.md. Pure Python (no torch): a 1,000-request run with long prompts takes
seconds, so behaviour at many GPUs and millions of tokens can be studied on a laptop.
"""

from __future__ import annotations

from medha.sim.metrics import MetricsSummary, RequestRecord, percentile, summarize
from medha.sim.replica import HARDWARE_NAMES, Deployment, PipelineExecutor, plan_times
from medha.sim.request_csv import read_requests_csv
from medha.sim.simulator import (
    ROUTINGS,
    ChunkRecord,
    Routing,
    SimResult,
    SimulationError,
    Simulator,
)
from medha.sim.traces import TraceError, TraceLengths, load_trace
from medha.sim.workload import (
    PAPER_LONG_MIX,
    LogNormalLengths,
    LongRequestMix,
    SimRequest,
    WorkloadError,
    poisson_arrivals,
    synthetic_workload,
)

__all__ = [
    "HARDWARE_NAMES",
    "PAPER_LONG_MIX",
    "ROUTINGS",
    "ChunkRecord",
    "Deployment",
    "LogNormalLengths",
    "LongRequestMix",
    "MetricsSummary",
    "PipelineExecutor",
    "RequestRecord",
    "Routing",
    "SimRequest",
    "SimResult",
    "SimulationError",
    "Simulator",
    "TraceError",
    "TraceLengths",
    "WorkloadError",
    "load_trace",
    "percentile",
    "plan_times",
    "poisson_arrivals",
    "read_requests_csv",
    "summarize",
    "synthetic_workload",
]
