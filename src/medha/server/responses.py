"""The response bodies of the OpenAI-compatible API, built from medha's TokenEvents.

A choice accumulates its events (`ChoiceOutput`); the two endpoints render it in their own
shapes: `text_completion` with the legacy logprobs table, `chat.completion` with a message and
per-token logprob objects. Beyond OpenAI's fields, a finished choice carries medha's `metrics`
(TTFT, TPOT, the deadline and whether it was met), which OpenAI's clients keep as extra fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medha.model.tokenizer import Tokenizer
from medha.request import RequestMetrics, TokenEvent, TokenLogprob

Rows = list[tuple[int, float | None, tuple[TokenLogprob, ...] | None]]
"""(token id, logprob, top logprobs) of each token of a stretch of a choice's output."""


class TokenStrings:
    """Each token id's text alone, as logprobs name tokens (a byte of a multi-byte character
    decodes to U+FFFD; `bytes` then holds its UTF-8), cached: top logprobs decode N per token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text


@dataclass
class ChoiceOutput:
    """What one choice (one engine request) produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    """Where each token's text starts in `text` (as OpenAI's text_offset): the length of the
    text streamed before its event, so streamed and whole responses agree."""
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] | None = None
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.text_offsets.append(len(self.text))
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                self.top_logprobs.append(event.top_logprobs)
        self.text += event.text
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
            self.prompt_top_logprobs = event.prompt_top_logprobs
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.metrics = event.metrics


def usage(choices: list[ChoiceOutput], prompt_tokens: list[int]) -> dict[str, int]:
    """OpenAI's token counts: each prompt once (however many choices it has), every output."""
    prompt = sum(prompt_tokens)
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def metrics_json(metrics: RequestMetrics | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {
        "ttft": metrics.ttft,
        "tpot": metrics.tpot,
        "e2e": metrics.e2e,
        "deadline": metrics.deadline,
        "deadline_met": metrics.deadline_met,
    }


def completion_logprobs(rows: Rows, offsets: list[int], strings: TokenStrings) -> dict[str, Any]:
    """The legacy completions table of `rows`, whose tokens start at `offsets` of the choice's
    text. Its top logprobs are keyed by text: of alternatives whose texts are the same (bytes of
    one character each decode to U+FFFD), the most likely is kept; chat's format has no such
    loss."""
    top = []
    for _, _, alternatives in rows:
        table: dict[str, float] = {}
        for alternative in alternatives or ():  # most likely first: it keeps a shared text
            table.setdefault(strings(alternative.token_id), alternative.logprob)
        top.append(table)
    return {
        "tokens": [strings(token_id) for token_id, _, _ in rows],
        "token_logprobs": [logprob for _, logprob, _ in rows],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _token_json(token_id: int, logprob: float | None, strings: TokenStrings) -> dict[str, Any]:
    text = strings(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    events: Rows,
    strings: TokenStrings,
) -> dict[str, Any]:
    """Chat's `logprobs.content`: one object per token, with its most likely alternatives."""
    content = []
    for token_id, logprob, alternatives in events:
        entry = _token_json(token_id, logprob, strings)
        entry["top_logprobs"] = [
            _token_json(t.token_id, t.logprob, strings) for t in alternatives or ()
        ]
        content.append(entry)
    return {"content": content}


def prompt_logprobs_json(
    choice: ChoiceOutput, prompt_ids: list[int], strings: TokenStrings
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob,
    decoded_token}} for the prompt's own token and the most likely ones."""
    if choice.prompt_logprobs is None:
        return None
    rows: list[dict[str, Any] | None] = []
    tops = choice.prompt_top_logprobs or ()
    for position, (token_id, logprob) in enumerate(
        zip(prompt_ids, choice.prompt_logprobs, strict=False)
    ):
        if logprob is None:
            rows.append(None)
            continue
        row = {str(token_id): {"logprob": logprob, "decoded_token": strings(token_id)}}
        for alternative in (tops[position] if position < len(tops) else None) or ():
            row.setdefault(
                str(alternative.token_id),
                {"logprob": alternative.logprob, "decoded_token": strings(alternative.token_id)},
            )
        rows.append(row)
    return rows


def logprob_rows(choice: ChoiceOutput, start: int = 0) -> Rows:
    """(token id, logprob, top logprobs) of the choice's tokens from `start` on."""
    tops = choice.top_logprobs
    return [
        (choice.token_ids[i], choice.logprobs[i], tops[i] if i < len(tops) else None)
        for i in range(start, len(choice.token_ids))
    ]
