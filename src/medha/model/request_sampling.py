"""One request's sampling state on the stage that samples, and sampling a batch of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medha.model.logits_processing import TokenHistory, TokenMask
from medha.model.sampler import SampleOutput, make_generator, sample
from medha.sampling import SamplingSetup


class RequestSampling:
    """A request's params, its own random generator, and its token history where penalties or
    min_tokens need one, and its prompt where it reports prompt logprobs. Kept across
    preemption: a seeded stream continues where it was, and the recomputed tokens are not
    counted again."""

    __slots__ = ("generator", "history", "params", "prompt_ids")

    def __init__(self, setup: SamplingSetup) -> None:
        self.params = setup.params
        self.generator = None if self.params.is_greedy else make_generator(self.params.seed)
        self.history = (
            TokenHistory(setup.prompt_len, setup.min_tokens_stop_ids, setup.bad_words_ids)
            if self.params.needs_history
            else None
        )
        if self.history is not None and setup.prompt_token_ids is not None:
            self.history.observe(0, setup.prompt_token_ids)
        self.prompt_ids = (
            setup.prompt_token_ids if self.params.prompt_logprobs is not None else None
        )

    def prompt_targets(self, first: int, count: int) -> tuple[int, ...]:
        """Prompt tokens first .. first + count - 1, whose log-probabilities it reports."""
        if self.prompt_ids is None:
            raise RuntimeError("prompt logprobs of a request whose prompt the stage was not sent")
        if not 1 <= first <= first + count <= len(self.prompt_ids):
            raise RuntimeError(
                f"prompt tokens {first}..{first + count - 1} asked of a {len(self.prompt_ids)}"
                "-token prompt"
            )
        return self.prompt_ids[first : first + count]

    def observe(self, start: int, token_ids: Sequence[int]) -> None:
        """The request's step feeds `token_ids` at positions from `start`."""
        if self.history is not None:
            self.history.observe(start, token_ids)


def sample_requests(
    logits: torch.Tensor,
    requests: Sequence[RequestSampling],
    token_masks: Sequence[TokenMask | None] | None = None,
) -> SampleOutput:
    """One token per row of `logits`, row i under `requests[i]` (and `token_masks[i]`, the
    tokens its structured output allows this step, where given)."""
    return sample(
        logits,
        [r.params for r in requests],
        [r.generator for r in requests],
        [r.history for r in requests],
        token_masks,
    )
