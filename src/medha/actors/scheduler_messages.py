"""What the scheduler actor takes in its mailbox (Submit, Abort) and what it records of each
iteration (IterationRecord)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medha.actors.tracked import TrackedRequest


@dataclass(frozen=True, slots=True)
class Submit:
    request: TrackedRequest


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str
    request: TrackedRequest | None = None
    """The request to abort (its stream ended early, or `Engine.abort` found it); None:
    whichever request holds the id. A stream may end long after its request finished (an
    abandoned async generator is closed when it is collected), and an aborted request's id is
    free at once: by the time this is handled, the id may be a new request's."""


@dataclass(frozen=True, slots=True)
class IterationRecord:
    """What one iteration ran: for the demo's timeline and the calibration report."""

    step_id: int
    started: float
    seconds: float
    predicted_seconds: float
    tokens: tuple[tuple[str, int, bool], ...]
    """(request id, query tokens, is prefill) per sequence."""
