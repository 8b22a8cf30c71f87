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
    # What every rank computes alike: the rows, and the first prompt token each span scores.
    spans: list[ScoreSpan] = []
    scored: list[str] = []
    offset = 0
    for work in works:
        rows = work.score_rows
        if rows:
            first = work.start + rows.start + 1
            spans.append(ScoreSpan(range(offset + rows.start, offset + rows.stop), first, 0))
            scored.append(work.request_id)
        offset += len(work.token_ids)
    if not spans:
        return {}
    if sampling_of is None:
        score_spans(hidden, spans, head, None)
        return {}
    try:
        samplings = [sampling_of(request_id) for request_id in scored]
        targets = [
            sampling.prompt_targets(span.first, len(span.rows))
            for sampling, span in zip(samplings, spans, strict=True)
        ]
    except Exception:
        # The TP peers are already in the head's all-gathers: make the same calls before
        # failing, so they fail on the next step instead of waiting out the timeout.
        score_spans(hidden, spans, head, None)
        raise
    spans = [
        ScoreSpan(span.rows, span.first, sampling.params.prompt_logprobs or 0)
        for sampling, span in zip(samplings, spans, strict=True)
    ]
    scores = score_spans(hidden, spans, head, targets)
    assert scores is not None
    return dict(zip(scored, scores, strict=True))
