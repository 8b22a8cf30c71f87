"""A step's prompt logprobs (SeqWork.score_rows), on the stage that holds its final hidden states:
shared by the single-process stage actor and the worker processes' last stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medha.actors.messages import SeqWork
from medha.model.prompt_scoring import PromptScores, ScoreSpan, score_spans
from medha.model.request_sampling import RequestSampling


def score_prompts(
    hidden: torch.Tensor,
    works: Sequence[SeqWork],
    head: Callable[[torch.Tensor], torch.Tensor],
    sampling_of: Callable[[str], RequestSampling] | None,
) -> dict[str, PromptScores]:
    """The prompt logprobs of `works` (the step's sequences, in the order of `hidden`'s rows),
    by request. `sampling_of` gives a request's sampling state on the rank that samples; a TP
    peer of that rank passes None, runs `head` on the same rows and gets {} back."""
    spans: list[ScoreSpan] = []
    targets: list[Sequence[int]] = []
    scored: list[str] = []
    offset = 0
    for work in works:
        rows = work.score_rows
        if rows:
            first = work.start + rows.start + 1
            top = 0
            if sampling_of is not None:
                sampling = sampling_of(work.request_id)
                top = sampling.params.prompt_logprobs or 0
                targets.append(sampling.prompt_targets(first, len(rows)))
            spans.append(ScoreSpan(range(offset + rows.start, offset + rows.stop), first, top))
            scored.append(work.request_id)
        offset += len(work.token_ids)
    if not spans:
        return {}
    scores = score_spans(hidden, spans, head, None if sampling_of is None else targets)
    return {} if scores is None else dict(zip(scored, scores, strict=True))
