"""The logit changes before temperature: allowed tokens, logit bias, penalties and min_tokens.

vLLM's semantics and order (HF's for the repetition penalty, which both share):
- allowed_token_ids: every other token gets -inf;
- logit_bias: added to its tokens' logits;
- repetition_penalty r: every id in the prompt or the output so far has its logit divided by r
  if positive, multiplied by r otherwise;
- frequency_penalty f and presence_penalty p: an id's logit loses f per occurrence in the
  output so far, and p once if it occurs there at all (the prompt does not count);
- min_tokens m: while fewer than m tokens have been generated, eos (unless ignore_eos) and the
  stop token ids get -inf.
In that order, on the raw logits, before temperature and the filters. The last three depend on
the request's tokens so far (TokenHistory).

The stage that samples sees every token of a request go through it (prompt chunks, then each
decode's input, which is the previous output), so it builds the history from its inputs; it
never needs the token ids of the whole context again. A preempted request recomputes the same
tokens, which the history has already counted: it goes by position and skips them.

One batched pass for all rows that need it: a handful of tensor ops over [rows, vocab],
whatever the number of rows, the same order of work as the softmax the sampler runs anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medha.sampling import SamplingParams


class TokenHistory:
    """What penalties and min_tokens need of one request's tokens: the ids its prompt holds,
    how often each id occurs in its output, and how many tokens it has generated."""

    __slots__ = (
        "_fed",
        "_prompt_ids",
        "_prompt_tensor",
        "min_tokens_stop_ids",
        "output_counts",
        "prompt_len",
    )

    def __init__(self, prompt_len: int, min_tokens_stop_ids: Sequence[int] = ()) -> None:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        self.prompt_len = prompt_len
        self.min_tokens_stop_ids = tuple(min_tokens_stop_ids)
        self.output_counts: dict[int, int] = {}
        self._prompt_ids: set[int] = set()
        self._prompt_tensor: torch.Tensor | None = None
        self._fed = 0

    def observe(self, start: int, token_ids: Sequence[int]) -> None:
        """Positions [start, start + len(token_ids)) hold `token_ids`. Positions observed before
        are skipped (a preempted request recomputes its tokens)."""
        if start > self._fed:
            raise ValueError(
                f"tokens from position {start}, but only positions before {self._fed} were seen"
            )
        new = token_ids[self._fed - start :]
        if not new:
            return
        in_prompt = max(0, min(len(new), self.prompt_len - self._fed))
        if in_prompt:
            self._prompt_ids.update(new[:in_prompt])
            self._prompt_tensor = None
        counts = self.output_counts
        for token in new[in_prompt:]:
            counts[token] = counts.get(token, 0) + 1
        self._fed += len(new)

    @property
    def num_generated(self) -> int:
        """Output tokens so far: those before the one about to be sampled."""
        return max(0, self._fed - self.prompt_len)

    def prompt_ids(self, device: torch.device) -> torch.Tensor:
        """The distinct ids of the prompt, int64 on `device` (built once, as the prompt only
        grows before the first sample)."""
        cached = self._prompt_tensor
        if cached is None or cached.device != device:
            cached = torch.tensor(sorted(self._prompt_ids), dtype=torch.int64, device=device)
            self._prompt_tensor = cached
        return cached


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
) -> torch.Tensor:
    """`logits` [R, V] (fp32) with each row's allowed tokens, logit bias, penalties and
    min_tokens mask applied. A row's history may be None only if its params need none."""
    logits = _restrict_and_bias(logits, params)
    if not any(p.needs_history for p in params):
        return logits
    known: list[TokenHistory] = []
    for p, history in zip(params, histories, strict=True):
        if history is None and p.needs_history:
            raise ValueError("rows with penalties or min_tokens need their token history")
        # No tokens: a row without penalties in a batch that has some.
        known.append(TokenHistory(prompt_len=1) if history is None else history)
    return _penalise(logits, params, known)


def _penalise(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]
) -> torch.Tensor:
    """The penalties and the min_tokens mask, by each row's history."""
    rows, vocab = logits.shape
    device = logits.device
    output_ids: list[int] = []
    output_counts: list[int] = []
    output_rows: list[int] = []
    for row, history in enumerate(histories):
        output_ids.extend(history.output_counts)
        output_counts.extend(history.output_counts.values())
        output_rows.extend([row] * len(history.output_counts))
    # Flat indices row * V + id, so each mask or count is one scatter for the whole batch.
    flat_output = torch.tensor(output_rows, dtype=torch.int64) * vocab + torch.tensor(
        output_ids, dtype=torch.int64
    )
    flat_output = flat_output.to(device)

    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros(rows * vocab, dtype=torch.bool, device=device)
        seen[flat_output] = True
        prompt_parts = [h.prompt_ids(device) + row * vocab for row, h in enumerate(histories)]
        seen[torch.cat(prompt_parts)] = True
        penalty = _column([p.repetition_penalty for p in params], device)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen.view(rows, vocab), penalised, logits)

    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = torch.zeros(rows * vocab, dtype=logits.dtype, device=device)
        counts[flat_output] = torch.tensor(output_counts, dtype=logits.dtype).to(device)
        counts = counts.view(rows, vocab)
        frequency = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    banned = [
        row * vocab + token
        for row, (p, history) in enumerate(zip(params, histories, strict=True))
        if history.num_generated < p.min_tokens
        for token in history.min_tokens_stop_ids
        if token < vocab  # a tokenizer's eos the model has no logit for is never sampled
    ]
    if banned:
        logits = (
            logits.flatten()
            .index_fill(0, torch.tensor(banned, dtype=torch.int64, device=device), float("-inf"))
            .view(rows, vocab)
        )
    return logits


def _restrict_and_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    rows, vocab = logits.shape
    device = logits.device
    allowed = [
        row * vocab + token for row, p in enumerate(params) for token in (p.allowed_token_ids or ())
    ]
    if allowed:
        keep = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        unrestricted = [row for row, p in enumerate(params) if p.allowed_token_ids is None]
        keep[unrestricted] = True
        keep.view(-1)[torch.tensor(allowed, dtype=torch.int64, device=device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    biased = [
        (row * vocab + token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias
    ]
    if biased:
        bias = torch.zeros(rows * vocab, dtype=logits.dtype, device=device)
        index, values = zip(*biased, strict=True)
        bias[torch.tensor(index, dtype=torch.int64, device=device)] = torch.tensor(
            values, dtype=logits.dtype
        ).to(device)
        logits = logits + bias.view(rows, vocab)
    return logits


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
