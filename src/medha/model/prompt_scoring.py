"""Prompt logprobs: how likely the model finds each prompt token, given the tokens before it.

The hidden state of position p predicts the token at p + 1. A request with
SamplingParams.prompt_logprobs has every such row of its prompt run through the LM head, not only
the last one that samples. A whole chunk's logits would be chunk x vocabulary floats (2 GiB for
4,096 tokens of Llama-3's 128K vocabulary), so they are computed SLICE_ROWS rows at a time, and
each slice is reduced to the few numbers kept before the next one is computed.

As for the sampler's logprobs (vLLM's convention), these are log_softmax of the raw logits: the
model's own belief, with no penalty, temperature or filter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medha.request import TokenLogprob

SLICE_ROWS = 256
"""Rows per LM-head call: bounds the transient logits at SLICE_ROWS x vocabulary values (with
TP, plus the all-gather's buffers): 128 MiB of fp32 for a 128K vocabulary, while each matmul
stays large enough to run at full speed."""


@dataclass(frozen=True, slots=True)
class PromptScores:
    """The log-probabilities of a request's prompt tokens first .. first + len(logprobs) - 1."""

    first: int
    """Index in the prompt of the first token scored (>= 1: the first token has no context)."""
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...]
    """Per token scored, the most likely tokens at its position, most likely first (empty
    tuples when none were asked for)."""


@dataclass(frozen=True, slots=True)
class ScoreSpan:
    """Consecutive rows of a step's hidden states whose next tokens one request scores."""

    rows: range
    """Rows of the step's hidden states, in position order."""
    first: int
    """Index in the prompt of the token the first row predicts."""
    top: int
    """How many of the most likely tokens to report per position."""


@torch.inference_mode()
def score_spans(
    hidden: torch.Tensor,
    spans: Sequence[ScoreSpan],
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: Sequence[Sequence[int]] | None,
) -> list[PromptScores] | None:
    """The PromptScores of each span of `hidden` [T, H] (final hidden states, before the norm).

    `head` maps hidden rows to fp32 logits [rows, V]. `targets[i]` holds the tokens span i's rows
    predict. A TP peer of the rank that scores passes None: it runs `head` on the same slices
    (its vocabulary all-gather is a collective) and gets None back.
    """
    index = [row for span in spans for row in span.rows]
    wanted: torch.Tensor | None = None
    if targets is not None:
        flat_targets = [token for span_targets in targets for token in span_targets]
        if len(flat_targets) != len(index):
            raise ValueError(f"{len(index)} rows to score but {len(flat_targets)} targets")
        wanted = to_device(flat_targets, hidden.device)
    most = max((span.top for span in spans), default=0)
    rows = to_device(index, hidden.device)
    chosen: list[torch.Tensor] = []
    top_values: list[torch.Tensor] = []
    top_ids: list[torch.Tensor] = []
    for begin in range(0, len(index), SLICE_ROWS):
        logits = head(hidden.index_select(0, rows[begin : begin + SLICE_ROWS]))
        if wanted is None:
            continue
        # log_softmax without a second vocabulary-wide tensor: the log-normaliser once, then
        # only the few values kept.
        normaliser = logits.logsumexp(dim=-1, keepdim=True)
        target = wanted[begin : begin + SLICE_ROWS].unsqueeze(1)
        chosen.append((logits.gather(1, target) - normaliser).squeeze(1))
        if most:
            values, ids = logits.topk(min(most, logits.shape[1]), dim=-1)
            top_values.append(values - normaliser)
            top_ids.append(ids)
    if wanted is None:
        return None
    # One device-to-host copy each, after every slice ran.
    logprobs = torch.cat(chosen).tolist() if chosen else []
    values_list = torch.cat(top_values).tolist() if top_values else []
    ids_list = torch.cat(top_ids).tolist() if top_ids else []
    scores = []
    offset = 0
    for span in spans:
        count = len(span.rows)
        tops = tuple(
            tuple(
                TokenLogprob(token, value)
                for token, value in zip(
                    ids_list[row][: span.top], values_list[row][: span.top], strict=True
                )
            )
            if span.top
            else ()
            for row in range(offset, offset + count)
        )
        scores.append(PromptScores(span.first, tuple(logprobs[offset : offset + count]), tops))
        offset += count
    return scores


def to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `values` on `device`. On a GPU through pinned memory, without
    blocking: a plain copy from pageable memory would first wait for all the work queued on
    the stream (the step's layers), and the GPU would idle while the host queues the rest."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
