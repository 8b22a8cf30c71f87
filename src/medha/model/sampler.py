"""The sampler: one token per row of a logits batch, each row under its own SamplingParams.

Runs every step on the last pipeline stage, so the work is batched tensor ops over all rows of a
kind; the per-row Python work is building small parameter tensors and one random draw per
randomly sampled row.

Order of operations for a random row (vLLM V1's): the structured output's mask, allowed
tokens, logit bias, penalties, min_tokens and bad words (medha.model.logits_processing),
temperature, min-p (against the top token of the whole tempered distribution), top-k, top-p (on
the distribution min-p and top-k leave, renormalised), then one draw. Min-p and top-k commute;
top-p does not: vLLM's V0 and HF apply min-p last, which keeps as many tokens or more when
both it and top-p are set. Greedy rows take the argmax of the adjusted logits (ties: the lowest
token id) and consume no randomness.

Batch invariance: a random row draws exactly one uniform number per step from ITS OWN
generator and turns it into a token by inverse-CDF lookup. So a seeded request yields the same
tokens whatever else shares its batch and whatever its row index.

The generators are Python's `random.Random` (Mersenne Twister, drawn on the host): it takes every
bit of a seed, where torch's CPU generator keeps only the low 32 (seeds 2**32 apart, such as
`user << 32 | i`, would share one stream), and a seed then draws the same numbers on every
device. One host draw per random row and step costs less than a device draw per row would.

Logprobs: like vLLM, the log-probability reported for a chosen token, and for the most likely
tokens at its position, is log_softmax of the raw logits (no penalty, temperature 1, nothing
filtered), i.e. the model's own belief, whichever way the token was chosen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from medha.model.logits_processing import TokenHistory, TokenMask, adjust_logits, adjusts_now
from medha.request import TokenLogprob
from medha.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class SampleOutput:
    """The tokens chosen for one batch, in row order."""

    token_ids: list[int]
    # log_softmax(raw logits)[token] for rows whose params ask for logprobs, else None.
    logprobs: list[float | None]
    # The params.logprobs most likely tokens of such rows (most likely first), else None.
    top_logprobs: list[tuple[TokenLogprob, ...] | None] = field(default_factory=list)


def make_generator(seed: int | None) -> random.Random:
    """One request's random stream: seeded (every bit of `seed` counts), or seeded from the
    operating system's entropy if seed is None."""
    return random.Random(seed)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[random.Random | None],
    histories: Sequence[TokenHistory | None] | None = None,
    token_masks: Sequence[TokenMask | None] | None = None,
) -> SampleOutput:
    """Choose one token per row of `logits` [B, V] (fp32, bf16 or fp16; computed in fp32).

    `generators[i]` is row i's generator; None uses Python's global one (`random.random`),
    which makes that row's draw depend on the rest of the batch. `histories[i]` is row i's
    token history, required where its params have penalties or min_tokens. `token_masks[i]`,
    where not None, is the bitmask of the tokens row i's structured output allows.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"{batch} logits rows but {len(params)} params and {len(generators)} generators"
        )
    if batch == 0:
        return SampleOutput(token_ids=[], logprobs=[])

    # Only the rows whose logits change this step (allowed tokens, bias, penalties, min_tokens)
    # get an fp32 copy: the others choose from the logits as they are.
    adjusted_rows, adjusted = _adjusted(logits, params, histories, token_masks)
    # torch.argmax returns the first maximal index: ties resolve to the lowest token id. Half
    # precision widens to fp32 exactly, so the argmax needs no fp32 copy of the logits.
    token_ids = logits.argmax(dim=-1)
    greedy = [i for i, row in enumerate(adjusted_rows) if params[row].is_greedy]
    if greedy:
        token_ids.index_copy_(
            0,
            torch.tensor([adjusted_rows[i] for i in greedy], device=logits.device),
            adjusted[torch.tensor(greedy, device=logits.device)].argmax(dim=-1),
        )
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        row_index = torch.tensor(random_rows, device=logits.device)
        random_logits = logits.index_select(0, row_index).float()
        where = {row: i for i, row in enumerate(adjusted_rows)}
        moved = [(j, where[row]) for j, row in enumerate(random_rows) if row in where]
        if moved:
            targets, sources = zip(*moved, strict=True)
            random_logits[torch.tensor(targets, device=logits.device)] = adjusted[
                torch.tensor(sources, device=logits.device)
            ]
        chosen = _sample_random_rows(
            random_logits,
            [params[i] for i in random_rows],
            [generators[i] for i in random_rows],
        )
        token_ids.index_copy_(0, row_index, chosen)
    logprobs, top_logprobs = _logprobs(logits, params, token_ids)
    return SampleOutput(token_ids.tolist(), logprobs, top_logprobs)


def _adjusted(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None] | None,
    token_masks: Sequence[TokenMask | None] | None,
) -> tuple[list[int], torch.Tensor]:
    """The rows whose logits change this step, and their fp32 logits after the structured
    output's mask, allowed tokens, logit bias, penalties and min_tokens ([rows, V]; empty if
    none)."""
    row_histories = [None] * len(params) if histories is None else list(histories)
    masks = [None] * len(params) if token_masks is None else list(token_masks)
    if len(masks) != len(params):
        raise ValueError(f"{len(params)} rows but {len(masks)} token masks")
    for p, history in zip(params, row_histories, strict=True):
        if history is None and p.needs_history:
            raise ValueError("rows with penalties or min_tokens need their token history")
    rows = [
        i for i, p in enumerate(params) if masks[i] is not None or adjusts_now(p, row_histories[i])
    ]
    if not rows:
        return [], logits.new_empty((0, logits.shape[1]), dtype=torch.float32)
    row_index = torch.tensor(rows, device=logits.device)
    adjusted = adjust_logits(
        logits.index_select(0, row_index).float(),
        [params[i] for i in rows],
        [row_histories[i] for i in rows],
        [masks[i] for i in rows],
    )
    return rows, adjusted


def _logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor
) -> tuple[list[float | None], list[tuple[TokenLogprob, ...] | None]]:
    """The chosen tokens' log-probabilities and each row's most likely tokens, for the rows
    whose params ask for them, from the raw logits."""
    batch = len(params)
    logprobs: list[float | None] = [None] * batch
    top_logprobs: list[tuple[TokenLogprob, ...] | None] = [None] * batch
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return logprobs, top_logprobs
    row_index = torch.tensor(rows, device=logits.device)
    log_probs = logits.index_select(0, row_index).float().log_softmax(dim=-1)
    chosen = log_probs.gather(1, token_ids.index_select(0, row_index).unsqueeze(1)).squeeze(1)
    for row, value in zip(rows, chosen.tolist(), strict=True):
        logprobs[row] = value
        top_logprobs[row] = ()
    most = max(params[i].logprobs or 0 for i in rows)
    if most:
        values, ids = log_probs.topk(min(most, log_probs.shape[1]), dim=-1)
        for row, row_values, row_ids in zip(rows, values.tolist(), ids.tolist(), strict=True):
            count = params[row].logprobs or 0
            top_logprobs[row] = tuple(
                TokenLogprob(token, value)
                for token, value in zip(row_ids[:count], row_values[:count], strict=True)
            )
    return logprobs, top_logprobs


def _sample_random_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[random.Random | None],
) -> torch.Tensor:
    """One token per row of fp32 `logits` [R, V], all rows non-greedy."""
    device = logits.device
    vocab = logits.shape[1]
    temperatures = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    scaled = _tempered(logits, temperatures)

    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        # p / p_max == exp(x - x_max) whatever the normalisation, so min-p needs no softmax.
        relative = (scaled - scaled.max(dim=-1, keepdim=True).values).exp()
        min_p = torch.tensor(min_ps, device=device).unsqueeze(1)
        scaled = scaled.masked_fill(relative < min_p, float("-inf"))

    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        scaled = _apply_top_k_top_p(scaled, top_ks, top_ps)
    elif any(k < vocab for k in top_ks):
        scaled = _apply_top_k(scaled, top_ks)

    probs = scaled.softmax(dim=-1)
    drawn = _draw_inverse_cdf(probs, _uniforms(generators, device))
    lost = drawn < 0
    if bool(lost.any()):
        # No distribution to draw from (the model's logits hold NaN or +inf): the row's most
        # likely token, NaN counting as least likely, rather than an id past the vocabulary,
        # which would fail the whole engine.
        rows = logits[lost].nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        drawn[lost] = rows.argmax(dim=-1)
    return drawn


def _tempered(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """logits / temperature, row by row. A temperature below 1 can overflow a logit near the
    largest float (where a repetition penalty of 1e-38 leaves one) to +inf, or a very negative
    one to -inf: the softmax of the first is NaN, and several overflowed logits would all look
    alike. Such rows are divided after subtracting their largest logit, which changes nothing
    the softmax, min-p, top-k or top-p see and keeps every gap."""
    scaled = logits / temperatures
    overflowed = ~scaled.amax(dim=-1).isfinite()
    if bool(overflowed.any()):
        rows = logits[overflowed]
        scaled[overflowed] = (rows - rows.amax(dim=-1, keepdim=True)) / temperatures[overflowed]
    return scaled


def _apply_top_k(logits: torch.Tensor, top_ks: Sequence[int]) -> torch.Tensor:
    """Mask (to -inf) tokens below each row's k-th largest logit, without a full sort."""
    vocab = logits.shape[1]
    largest_k = max(k for k in top_ks if k < vocab)
    top_values = logits.topk(largest_k, dim=-1).values
    kth_rank = torch.tensor([min(k, largest_k) - 1 for k in top_ks], device=logits.device)
    threshold = top_values.gather(1, kth_rank.unsqueeze(1))
    # Rows without top-k keep every token.
    disabled = torch.tensor([k >= vocab for k in top_ks], device=logits.device).unsqueeze(1)
    threshold = threshold.masked_fill(disabled, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _apply_top_k_top_p(
    logits: torch.Tensor, top_ks: Sequence[int], top_ps: Sequence[float]
) -> torch.Tensor:
    """Mask (to -inf) tokens below each row's k-th largest logit, then outside its nucleus."""
    device = logits.device
    # Stable sort: among tied logits the lower token id ranks first, so the nucleus is
    # deterministic.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)
    # Top-k by threshold, ties at the k-th value kept, exactly like _apply_top_k: a row's tokens
    # must not depend on which path its batch took.
    kth_rank = torch.tensor([k - 1 for k in top_ks], device=device).unsqueeze(1)
    threshold = sorted_logits.gather(1, kth_rank)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))

    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p == 1 keeps everything: rounding can push the cumulative mass to 1.0 before the
    # tail, and that tail must not be dropped.
    top_p = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps], device=device).unsqueeze(1)
    # A token is in the nucleus if the mass ranked above it is still short of top_p. The top
    # token is always kept, explicitly: a top_p below fp32's smallest subnormal rounds to 0,
    # which `mass_before >= top_p` would drop too.
    outside = mass_before >= top_p
    outside[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, sorted_ids, sorted_logits)


def _uniforms(generators: Sequence[random.Random | None], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, each from that row's own generator, as fp32 on `device`
    (one copy for the whole batch). A draw may round up to 1.0 in fp32; _draw_inverse_cdf
    keeps its target below the total."""
    draws = [random.random() if g is None else g.random() for g in generators]
    return torch.tensor(draws, dtype=torch.float32, device=device)


def _draw_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token i of each row such that cdf[i-1] <= u * total < cdf[i]; -1 for a row without a
    finite positive total (NaN probabilities)."""
    # fp32 is enough: each token's share of the cdf is off by one rounding (~1e-7 absolute)
    # however long the vocabulary, since neighbouring boundaries carry the same accumulated error.
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the lookup lands on a token with mass: filtered tokens have
    # zero-width intervals and the tail after the last kept token sits at the total.
    targets = torch.minimum(uniforms.unsqueeze(1) * total, total.nextafter(torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    valid = ((total > 0) & total.isfinite()).squeeze(1)
    return drawn.masked_fill_(~valid, -1)
