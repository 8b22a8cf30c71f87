"""Messages between the scheduler actor and the stage actors: small, typed, deltas only.

A sequence's step carries only its new query tokens and the blocks allocated for this step;
the stage keeps each request's block table and sampling state from earlier steps.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medha.request import TokenLogprob
from medha.sampling import SamplingSetup

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from medha.model.prompt_scoring import PromptScores
    from medha.model.sampler import SampleOutput


@dataclass(frozen=True, slots=True)
class SeqWork:
    request_id: str
    start: int
    """Absolute position of token_ids[0]."""
    token_ids: tuple[int, ...]
    new_blocks: tuple[int, ...]
    """Blocks to append to the request's block table before the step."""
    samples: bool
    """Sample a token after this step (the last chunk of a prompt, or a decode)."""
    sampling: SamplingSetup | None = None
    """Sent with the request's first step only; None afterwards."""
    decode: bool = False
    """A decode: when the step pauses, it is finished at once (see StepPaused.sampled)."""
    score_rows: range = range(0)
    """Rows of token_ids whose next token, a prompt token, gets its log-probability reported
    (SamplingParams.prompt_logprobs; see medha.model.prompt_scoring)."""
    token_mask: NDArray[np.int32] | None = field(default=None, compare=False)
    """With a token to sample under a structured output: the tokens its grammar allows, one bit
    each (medha.grammar.GrammarMatcher.next_mask); None: any."""


@dataclass(frozen=True, slots=True)
class ModelStep:
    step_id: int
    seqs: tuple[SeqWork, ...]
    release: tuple[str, ...] = ()
    """Requests to forget before the step (finished or aborted: their blocks are reclaimed)."""
    preempted: tuple[str, ...] = ()
    """Requests whose block table to clear (evicted; they will recompute their KV). Their
    sampling state stays, so a seeded request's random stream continues where it was."""
    pause: threading.Event | None = None
    """Set (from the event loop) to stop the step at its next layer boundary: the stage then
    answers StepPaused and keeps the step until a ResumeStep. None: the step runs through."""


@dataclass(frozen=True, slots=True)
class ResumeStep:
    """Carry on with a paused step where it stopped."""

    step_id: int
    pause: threading.Event | None = None
    """As ModelStep.pause, for the rest of the step."""


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None
    top_logprobs: tuple[TokenLogprob, ...] | None = None


def sampled_tokens(request_ids: Sequence[str], out: SampleOutput) -> dict[str, SampledToken]:
    """The sampler's output for rows `request_ids`, by request."""
    return {
        request_id: SampledToken(token, logprob, top)
        for request_id, token, logprob, top in zip(
            request_ids, out.token_ids, out.logprobs, out.top_logprobs, strict=True
        )
    }


@dataclass(frozen=True, slots=True)
class StepPaused:
    step_id: int
    layers_done: int
    seconds: float
    """Compute time so far."""
    sampled: dict[str, SampledToken]
    """The step's decodes, run through their remaining layers when it paused: a pause holds
    back prefill chunks only, never a token a stream is waiting for."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    step_id: int
    sampled: dict[str, SampledToken]
    seconds: float
    """Wall time the model step took (for calibration and the predicted-vs-measured report);
    for a step that was paused, the sum of its pieces."""
    prompt_scores: dict[str, PromptScores] = field(default_factory=dict)
    """The prompt logprobs the step computed (SeqWork.score_rows), by request."""


@dataclass(frozen=True, slots=True)
class Forget:
    """Release and preempt without running a step (an empty plan may still carry both)."""

    release: tuple[str, ...]
    preempted: tuple[str, ...] = ()
