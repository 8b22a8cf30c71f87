"""Priority policies: who gets the next prefill tokens. Smallest key goes first.

Keys depend on `now`, so the scheduler recomputes them every iteration. The deadline rule lives
here too, so that everything about urgency is in one file:

    slack            s_i(t)   = a_i + d_i - t - w_i(t)
    relative slack   rho_i(t) = s_i(t) / d_i
    default deadline d_i      = max(1.5 x w_i_total, 0.5 s)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from medha.scheduler.config import PolicyName, SchedulerConfig
from medha.scheduler.cost import BatchCostModel
from medha.scheduler.request import SchedRequest


def default_deadline(total_prefill_s: float, config: SchedulerConfig) -> float:
    """d_i when the caller gives none: proportional to the request's own work, with a floor
    so that tiny requests are not made urgent from the moment they arrive."""
    return max(config.deadline_factor * total_prefill_s, config.min_deadline)


def slack(
    request: SchedRequest, now: float, cost: BatchCostModel, cursor: int | None = None
) -> float:
    """Seconds to spare if the rest of the prefill (from `cursor`, default the request's
    issued cursor) ran alone from now on."""
    remaining = request.remaining_prefill_s(cost, cursor)
    return request.arrival + request.deadline - now - remaining


def relative_slack(
    request: SchedRequest, now: float, cost: BatchCostModel, cursor: int | None = None
) -> float:
    """Slack as a fraction of the request's deadline budget (falls at rate 1/d_i)."""
    return slack(request, now, cost, cursor) / request.deadline


class PriorityPolicy(ABC):
    """Orders prefills: the request with the smallest key is served first.

    Every key here is affine in time, key(t) = base - rate * t, with base and rate fixed until
    the request's cursor moves. Policies state (base, rate); the scheduler caches them, so
    ranking 1,000 waiting requests each iteration costs one multiply-add per request.
    """

    name: ClassVar[str]
    lead_guard: ClassVar[bool] = False
    """Whether SchedulerConfig.lead_guard applies (medha.scheduler.lead_guard): only where
    serving a request raises its key, which makes requests take turns. The baselines keep
    the order their definitions give."""
    shares_prefixes_in_flight: ClassVar[bool] = False
    """Whether a queued request waits for a prefix a started prefill computes, which then
    inherits its priority (medha.scheduler.prefix_sharing). Medha's policy only, for the same
    reason."""

    @abstractmethod
    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        """(base, rate) such that the request's key at time t is base - rate * t, its
        remaining work counted from `cursor` (default: its issued cursor)."""

    def key(self, request: SchedRequest, now: float, cost: BatchCostModel) -> float:
        """The request's priority at time `now` (ties broken by arrival order)."""
        base, rate = self.key_terms(request, cost)
        return base - rate * now

    def refresh(self, request: SchedRequest, cost: BatchCostModel) -> None:
        """Cache the request's key terms for its current cursor (see `ranked`)."""
        request.key_base, request.key_rate = self.key_terms(request, cost)
        request.key_cursor, request.key_known = request.issued, request.known_tokens

    def ranked(
        self, requests: Iterable[SchedRequest], now: float, cost: BatchCostModel
    ) -> list[tuple[float, int, SchedRequest]]:
        """(key, arrival order, request) for each request, from cached key terms, recomputing
        stale ones (the cursor moved since `refresh`) first."""
        requests = list(requests)
        for request in requests:
            known = request.prompt_len + request.generated
            if request.key_cursor != request.issued or request.key_known != known:
                self.refresh(request, cost)
        return [(r.key_base - r.key_rate * now, r.order, r) for r in requests]

    @staticmethod
    def keys(requests: list[SchedRequest], now: float) -> list[float]:
        """Keys at `now` from cached terms the caller knows are fresh: the scheduler refreshes a
        request whenever it is queued, and a queued request's cursor does not move."""
        return [r.key_base - r.key_rate * now for r in requests]


class FirstComeFirstServed(PriorityPolicy):
    name = "fcfs"

    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        return request.arrival, 0.0


class EarliestDeadlineFirst(PriorityPolicy):
    name = "edf"

    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        return request.deadline_at, 0.0


class ShortestRemainingFirst(PriorityPolicy):
    name = "srpt"

    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        return request.remaining_prefill_s(cost, cursor), 0.0


class LeastRawSlack(PriorityPolicy):
    """LRS: raw slack s_i(t); favours tight absolute deadlines, never normalises by size."""

    name = "lrs"

    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        return slack(request, 0.0, cost, cursor), 1.0


class LengthAwareRelativeSlack(PriorityPolicy):
    """LARS: relative slack rho_i(t), so a long request's urgency grows slowly but steadily."""

    name = "lars"
    lead_guard = True
    shares_prefixes_in_flight = True

    def key_terms(
        self, request: SchedRequest, cost: BatchCostModel, cursor: int | None = None
    ) -> tuple[float, float]:
        return relative_slack(request, 0.0, cost, cursor), 1.0 / request.deadline


class ChunkingMode(Enum):
    WHOLE = "whole"
    """Non-preemptive: a started prompt is prefilled in one step (up to a KVP boundary)."""
    FIXED = "fixed"
    """Sarathi-style: a fixed token budget per iteration shared by decodes and prefills."""
    ADAPTIVE = "adaptive"
    """Medha: the largest chunk whose predicted batch time fits the time budget."""


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A named scheduling policy: a priority order plus a way to size prefill chunks."""

    name: PolicyName
    priority: PriorityPolicy
    chunking: ChunkingMode


def policy_for(name: PolicyName) -> PolicySpec:
    fcfs = FirstComeFirstServed()
    specs: dict[PolicyName, PolicySpec] = {
        "fcfs": PolicySpec("fcfs", fcfs, ChunkingMode.WHOLE),
        "fcfs-chunked": PolicySpec("fcfs-chunked", fcfs, ChunkingMode.FIXED),
        "edf": PolicySpec("edf", EarliestDeadlineFirst(), ChunkingMode.ADAPTIVE),
        "srpt": PolicySpec("srpt", ShortestRemainingFirst(), ChunkingMode.ADAPTIVE),
        "lrs": PolicySpec("lrs", LeastRawSlack(), ChunkingMode.ADAPTIVE),
        "lars": PolicySpec("lars", LengthAwareRelativeSlack(), ChunkingMode.ADAPTIVE),
    }
    try:
        return specs[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(specs)}") from None
