"""`echo` on /v1/completions: each choice's text starts with its prompt, and with `logprobs`
its logprobs table starts with the prompt's tokens, scored by the model (the first has no
context, so no score). `max_tokens: 0` with `echo` scores the prompt and generates nothing.

This is how evaluation harnesses ask a server for a text's likelihood (lm-evaluation-harness's
`local-completions` sends `echo: true, logprobs: 1, max_tokens: 1`): it is the engine's
`prompt_logprobs` in OpenAI's legacy table.

A text prompt is echoed as sent, its tokens' offsets from the tokenizer's own offset mapping
(a BOS the tokenizer added has no text, and starts at 0). A prompt of token ids, or a text the
engine truncated (`truncate_prompt_tokens`), is echoed as its tokens decode, special tokens
included, as the logprobs name them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from medha.detokenizer import IncrementalDetokenizer
from medha.model.tokenizer import Tokenizer
from medha.request import TokenEvent, TokenLogprob


@dataclass(frozen=True)
class EchoedPrompt:
    """A prompt as a choice's text starts with it."""

    token_ids: tuple[int, ...]
    text: str
    offsets: tuple[int, ...]
    """Where each token's text starts in `text` (OpenAI's text_offset)."""


def echoed_prompt(
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    prompt_ids: Sequence[int],
    add_special_tokens: bool,
    prompt_only: bool,
) -> EchoedPrompt:
    """The echo of `prompt`, which the engine runs as `prompt_ids`; `prompt_only`: no output
    follows it (a character the prompt's last tokens leave unfinished is then shown as
    U+FFFD, else the output's first text completes it)."""
    if isinstance(prompt, str):
        encoded = tokenizer.hf_tokenizer(
            prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        if list(encoded["input_ids"]) == list(prompt_ids):  # else truncated
            starts = tuple(int(start) for start, _ in encoded["offset_mapping"])
            return EchoedPrompt(tuple(prompt_ids), prompt, starts)
    return _decoded(tokenizer, prompt_ids, prompt_only)


def _decoded(tokenizer: Tokenizer, prompt_ids: Sequence[int], flush: bool) -> EchoedPrompt:
    """`prompt_ids` decoded token by token (linear in the prompt's length), special tokens
    included."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    text: list[str] = []
    offsets = []
    length = 0
    for token in prompt_ids:
        offsets.append(length)
        delta = detokenizer.step(token)
        text.append(delta)
        length += len(delta)
    if flush:
        text.append(detokenizer.flush())
    return EchoedPrompt(tuple(prompt_ids), "".join(text), tuple(offsets))


Row = tuple[int, float | None, tuple[TokenLogprob, ...] | None]


def prompt_rows(
    prompt: EchoedPrompt,
    logprobs: Sequence[float | None] | None,
    top_logprobs: Sequence[tuple[TokenLogprob, ...] | None] | None,
    top: int,
) -> list[Row]:
    """The logprobs-table rows of the prompt's tokens: each token's logprob and its `top`
    most likely alternatives (None where unscored: the first token, or the rest of a prompt
    whose request was aborted before it was scored)."""
    rows: list[Row] = []
    for position, token in enumerate(prompt.token_ids):
        logprob = logprobs[position] if logprobs and position < len(logprobs) else None
        tops = top_logprobs[position] if top_logprobs and position < len(top_logprobs) else None
        rows.append((token, logprob, None if tops is None or logprob is None else tops[:top]))
    return rows


def without_output(event: TokenEvent) -> TokenEvent:
    """An event of a request that only scores its prompt (`max_tokens: 0`; the engine samples
    one token, which is not shown): no token, and a finish reason of "length"."""
    finish = event.finish_reason
    return dataclasses.replace(
        event,
        token_id=None,
        text="",
        logprob=None,
        top_logprobs=None,
        finish_reason=None if finish is None else "abort" if finish == "abort" else "length",
    )
