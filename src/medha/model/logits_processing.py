"""The logit changes before temperature: structured outputs, allowed tokens, logit bias,
penalties, min_tokens and bad words.

vLLM's semantics and order (HF's for the repetition penalty, which both share):
- structured_outputs: the tokens the request's grammar does not allow next get -inf (the
  scheduler actor computes the mask, medha.grammar; here it is only applied);
- allowed_token_ids: every other token gets -inf (where that leaves no token the grammar
  allows, the grammar's tokens win: the output must stay valid);
- logit_bias: added to its tokens' logits;
- repetition_penalty r: every id in the prompt or the output so far has its logit divided by r
  if positive, multiplied by r otherwise;
- frequency_penalty f and presence_penalty p: an id's logit loses f per occurrence in the
  output so far, and p once if it occurs there at all (the prompt does not count);
- min_tokens m: while fewer than m tokens have been generated, eos (even with ignore_eos) and
  the stop token ids get -inf;
- bad_words: a bad word's last token gets -inf when the output so far ends with the rest of it
  (a one-token word: always);
unless a mask would leave no token at all (allowed_token_ids that are all stop tokens win).
In that order, on the raw logits, before temperature and the filters. The last four depend on
the request's tokens so far (TokenHistory). A row is adjusted only in the steps where one of
them applies (a min_tokens request stops paying once it has generated enough).

The stage that samples sees every token of a request go through it (prompt chunks, then each
decode's input, which is the previous output), so it builds the history from its inputs; it
never needs the token ids of the whole context again. A preempted request recomputes the same
tokens, which the history has already counted: it goes by position and skips them.

One batched pass for all rows that need it: a handful of tensor ops over [rows, vocab],
whatever the number of rows, the same order of work as the softmax the sampler runs anyway; the
host builds index lists of the distinct output ids of the penalised rows only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

from medha.sampling import SamplingParams

TokenMask: TypeAlias = NDArray[np.int32]
"""The tokens a structured output allows next: token t is bit t % 32 of word t // 32
(llguidance's layout). Tokens past its last word are not allowed."""


class TokenHistory:
    """What penalties, min_tokens and bad words need of one request's tokens: the ids its prompt
    holds, the ids of its output so far, and how many tokens it has generated."""

    __slots__ = (
        "_bad_after",
        "_bad_prefix_lengths",
        "_fed",
        "_num_output",
        "_output",
        "_prompt_ids",
        "_prompt_tensor",
        "bad_words_ids",
        "min_tokens_stop_ids",
        "prompt_len",
    )

    def __init__(
        self,
        prompt_len: int,
        min_tokens_stop_ids: Sequence[int] = (),
        bad_words_ids: Sequence[Sequence[int]] = (),
    ) -> None:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        self.prompt_len = prompt_len
        self.min_tokens_stop_ids = tuple(min_tokens_stop_ids)
        self.bad_words_ids = tuple(tuple(word) for word in bad_words_ids if word)
        # Each step asks which bad words the output's tail starts: one lookup per distinct
        # prefix length, not one comparison per word (a filter list may hold thousands).
        self._bad_after: dict[tuple[int, ...], list[int]] = {}
        for word in self.bad_words_ids:
            self._bad_after.setdefault(word[:-1], []).append(word[-1])
        self._bad_prefix_lengths = sorted({len(prefix) for prefix in self._bad_after})
        self._prompt_ids: set[int] = set()
        self._prompt_tensor: torch.Tensor | None = None
        # The output's ids in a host tensor that doubles when full: each step reads them as one
        # view, with no per-id Python work.
        self._output = torch.empty(16, dtype=torch.int64)
        self._num_output = 0
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
        output = new[in_prompt:]
        if output:
            end = self._num_output + len(output)
            if end > len(self._output):
                grown = torch.empty(max(end, 2 * len(self._output)), dtype=torch.int64)
                grown[: self._num_output] = self._output[: self._num_output]
                self._output = grown
            if len(output) == 1:
                self._output[self._num_output] = output[0]
            else:
                self._output[self._num_output : end] = torch.tensor(output, dtype=torch.int64)
            self._num_output = end
        self._fed += len(new)

    def output_ids(self) -> torch.Tensor:
        """The output's ids so far, in order (a view of a host tensor: read, do not keep)."""
        return self._output[: self._num_output]

    def banned_bad_word_ids(self) -> list[int]:
        """The last token of every bad word whose other tokens end the output so far."""
        if not self._bad_after:
            return []
        longest = min(self._bad_prefix_lengths[-1], self._num_output)
        tail = tuple(self._output[self._num_output - longest : self._num_output].tolist())
        banned: list[int] = []
        for length in self._bad_prefix_lengths:
            if length > longest:
                break
            banned += self._bad_after.get(tail[longest - length :], ())
        return banned

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


def adjusts_now(params: SamplingParams, history: TokenHistory | None) -> bool:
    """Whether a row's logits change this step: a min_tokens request stops needing it once
    it has generated enough, so a long output does not keep paying for it."""
    return (
        params.has_penalties
        or bool(params.logit_bias)
        or params.allowed_token_ids is not None
        or (
            history is not None
            and (
                bool(history.bad_words_ids)
                or (history.num_generated < params.min_tokens and bool(history.min_tokens_stop_ids))
            )
        )
    )


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
    token_masks: Sequence[TokenMask | None] | None = None,
) -> torch.Tensor:
    """`logits` [R, V] (fp32) with each row's structured output mask, allowed tokens, logit
    bias, penalties, min_tokens and bad words applied. A row's history may be None only if its
    params need none."""
    logits = _restrict_and_bias(logits, params, token_masks)
    if not any(p.needs_history for p in params):
        return logits
    known: list[TokenHistory] = []
    for p, history in zip(params, histories, strict=True):
        if history is None and p.needs_history:
            raise ValueError("rows with penalties or min_tokens need their token history")
        # No tokens: a row without penalties in a batch that has some.
        known.append(TokenHistory(prompt_len=1) if history is None else history)
    if any(p.has_penalties for p in params):
        logits = _penalise(logits, params, known)
    return _mask_banned(logits, params, known)


def _penalise(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]
) -> torch.Tensor:
    """The repetition, frequency and presence penalties, by each row's history."""
    rows, vocab = logits.shape
    device = logits.device
    # Flat indices row * V + id of every output token of the penalised rows (repeats included),
    # so each mask or count is one scatter for the whole batch.
    penalised_rows = [row for row, p in enumerate(params) if p.has_penalties]
    outputs = [histories[row].output_ids() for row in penalised_rows]
    lengths = torch.tensor([len(ids) for ids in outputs], dtype=torch.int64)
    row_of = torch.repeat_interleave(torch.tensor(penalised_rows, dtype=torch.int64), lengths)
    flat_output = (row_of * vocab + torch.cat(outputs)).to(device)

    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros(rows * vocab, dtype=torch.bool, device=device)
        seen[flat_output] = True
        prompt_parts = [
            h.prompt_ids(device) + row * vocab
            for row, (p, h) in enumerate(zip(params, histories, strict=True))
            if p.repetition_penalty != 1.0
        ]
        seen[torch.cat(prompt_parts)] = True
        penalty = _column([p.repetition_penalty for p in params], device)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        # A penalty near 0 (or huge) overflows a finite logit to +-inf, and a softmax over
        # +inf is NaN: keep finite logits finite (-inf ones, masked tokens, stay -inf).
        most = torch.finfo(logits.dtype).max
        penalised = torch.where(logits.isfinite(), penalised.clamp(-most, most), penalised)
        logits = torch.where(seen.view(rows, vocab), penalised, logits)

    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = torch.zeros(rows * vocab, dtype=logits.dtype, device=device)
        counts.index_add_(0, flat_output, torch.ones_like(flat_output, dtype=logits.dtype))
        counts = counts.view(rows, vocab)
        frequency = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def _mask_banned(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]
) -> torch.Tensor:
    """-inf for what min_tokens and bad words ban this step."""
    rows, vocab = logits.shape
    banned: list[int] = []
    for row, (p, history) in enumerate(zip(params, histories, strict=True)):
        tokens = history.banned_bad_word_ids()
        if history.num_generated < p.min_tokens:
            tokens.extend(history.min_tokens_stop_ids)
        # A tokenizer's eos that the model has no logit for is never sampled anyway.
        banned.extend(row * vocab + token for token in tokens if token < vocab)
    if not banned:
        return logits
    index = torch.tensor(banned, dtype=torch.int64, device=logits.device)
    masked = logits.flatten().index_fill(0, index, float("-inf")).view(rows, vocab)
    # allowed_token_ids that hold only banned tokens leave nothing to sample: the request asked
    # for both, and the allowed tokens win (a softmax over no token is NaN).
    empty = ~masked.isfinite().any(dim=-1, keepdim=True)
    return torch.where(empty, logits, masked)


def _restrict_and_bias(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_masks: Sequence[TokenMask | None] | None,
) -> torch.Tensor:
    rows, vocab = logits.shape
    device = logits.device
    keep = _grammar_keep(rows, vocab, token_masks, device)
    allowed = [
        _id_tensor(p.allowed_token_ids) + row * vocab
        for row, p in enumerate(params)
        if p.allowed_token_ids is not None
    ]
    if allowed:
        listed = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        unrestricted = [row for row, p in enumerate(params) if p.allowed_token_ids is None]
        listed[unrestricted] = True
        listed.view(-1)[torch.cat(allowed).to(device)] = True
        if keep is None:
            keep = listed
        else:
            both = keep & listed
            keep = torch.where(both.any(dim=-1, keepdim=True), both, keep)
    if keep is not None:
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


def _grammar_keep(
    rows: int, vocab: int, token_masks: Sequence[TokenMask | None] | None, device: torch.device
) -> torch.Tensor | None:
    """[rows, vocab] bool: the tokens each row's structured output allows (all, for rows
    without one); None if no row has one."""
    if token_masks is None or all(mask is None for mask in token_masks):
        return None
    if len(token_masks) != rows:
        raise ValueError(f"{rows} rows but {len(token_masks)} token masks")
    masked = [row for row, mask in enumerate(token_masks) if mask is not None]
    # Little-endian words: token t is then bit t % 8 of byte t // 8, which unpackbits reads.
    words = np.stack([mask for mask in token_masks if mask is not None]).astype("<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=1, count=vocab, bitorder="little")
    keep = torch.ones(rows, vocab, dtype=torch.bool, device=device)
    keep[torch.tensor(masked, device=device)] = torch.from_numpy(bits).bool().to(device)
    return keep


@functools.lru_cache(maxsize=1024)
def _id_tensor(ids: tuple[int, ...]) -> torch.Tensor:
    """A request's allowed ids as a host tensor, built once (every step of every request with
    the same list reuses it), not as a Python list per step."""
    return torch.tensor(ids, dtype=torch.int64)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
