"""The pure-Python scheduler: LARS and baseline policies, adaptive chunking, paged KV block
accounting, KVP placement and SPP cursors. Imports no torch and reads no clock: the engine and
the simulator drive the same Scheduler with their own notion of time.
"""

from __future__ import annotations

from medha.scheduler.config import POLICY_NAMES, PolicyName, SchedulerConfig
from medha.scheduler.cost import BatchCostModel, SeqShape
from medha.scheduler.plan import BatchPlan, KvShard, ScheduledSeq, SeqKind
from medha.scheduler.request import RequestStatus, SchedRequest
from medha.scheduler.scheduler import Scheduler
from medha.scheduler.stats import SchedulerStats

__all__ = [
    "POLICY_NAMES",
    "BatchCostModel",
    "BatchPlan",
    "KvShard",
    "PolicyName",
    "RequestStatus",
    "SchedRequest",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "SeqKind",
    "SeqShape",
]
