"""The response bodies of the OpenAI-compatible API, built from medha's TokenEvents.

A choice accumulates its events (`ChoiceOutput`); a `Renderer` gives it the shape of its
endpoint: `text_completion` with the legacy logprobs table, `chat.completion` with a message and
per-token logprob objects, whole or as stream deltas. Beyond OpenAI's fields, a finished choice
carries medha's `metrics` (TTFT, TPOT, the deadline and whether it was met), which OpenAI's
clients keep as extra fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medha.detokenizer import REPLACEMENT_CHAR
from medha.model.tokenizer import Tokenizer
from medha.request import RequestMetrics, TokenEvent, TokenLogprob
from medha.server.echo import EchoedPrompt, prompt_rows
from medha.server.reasoning import Reasoning, ThinkingSplit
from medha.server.tool_calls import ToolCalling, ToolCallStream

Rows = list[tuple[int, float | None, tuple[TokenLogprob, ...] | None]]
"""(token id, logprob, top logprobs) of each token of a stretch of a choice's output."""

_FLOOR = -9999.0
"""A logprob of -inf (or NaN) as JSON, which has neither (vLLM's value)."""


def _finite(logprob: float | None) -> float | None:
    if logprob is None or math.isfinite(logprob):
        return logprob
    return _FLOOR


def token_id_name(token_id: int) -> str:
    """A token's name in logprobs with vLLM's `return_tokens_as_token_ids`: `token_id:ID`.
    Unlike its text, it tells every token apart (the bytes of one character each decode to
    U+FFFD; different tokens may spell the same text), which is what a client that trains on
    the sampled tokens (RL) needs."""
    return f"token_id:{token_id}"


class TokenStrings:
    """Each token id's text alone, as logprobs name tokens (a byte of a multi-byte character
    decodes to U+FFFD), cached: top logprobs decode N per token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._shown: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text

    def shown(self, token_id: int) -> str:
        """The token's text as an output shows it: none for a special token (skipped, the
        default; where a request shows them, their text comes with their own event)."""
        text = self._shown.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=True)
            self._shown[token_id] = text
        return text


@dataclass
class ChoiceOutput:
    """What one choice (one engine request) produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    """Where each token's text starts in `text` (as OpenAI's text_offset), known when its event
    arrives, so streamed and whole responses agree: the text streamed before it, plus the text
    alone (`token_text`) of the tokens since the last event that released text (a possible stop
    string, bytes of an unfinished character, held back), which comes out before its own. (A
    release of only part of the held text counts it all released.)"""
    token_text: Callable[[int], str] | None = None
    """A token's text as outputs show it (TokenStrings.shown: none for a skipped special
    token); None: held-back tokens count nothing."""
    held_back: int = 0
    """Characters of `token_text` of the tokens since the last event that released text; the
    byte pieces of one unfinished character (U+FFFD each) count one together, as the character
    they make, so that offsets never go back once it is released."""
    held_piece: bool = False
    """The held-back text ends in a byte piece (U+FFFD) that a next one may continue."""
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] | None = None
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    tool_stream: ToolCallStream | None = None
    """A streamed chat's tool calls, as far as they have gone out."""
    thinking: ThinkingSplit | None = None
    """A streamed chat's thinking and answer, as far as they have gone out."""
    echo: EchoedPrompt | None = None
    """The prompt the text starts with (completions' `echo`)."""
    echo_sent: bool = False
    """A stream sent the echo (with the choice's first chunk)."""

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.text_offsets.append(len(self.text) + self.held_back)
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            if event.top_logprobs is not None:
                self.top_logprobs.append(event.top_logprobs)
        self.text += event.text
        if event.text:
            self.held_back, self.held_piece = 0, False  # released (with this token's own text)
        elif event.token_id is not None and self.token_text is not None:
            text = self.token_text(event.token_id)
            if text and not text.strip(REPLACEMENT_CHAR):  # byte pieces: one character at most
                self.held_back += 0 if self.held_piece else 1
            else:
                self.held_back += len(text)
            self.held_piece = text.endswith(REPLACEMENT_CHAR)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
            self.prompt_top_logprobs = event.prompt_top_logprobs
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.metrics = event.metrics

    def rows(self) -> Rows:
        tops = self.top_logprobs
        return [
            (token, self.logprobs[i], tops[i] if i < len(tops) else None)
            for i, token in enumerate(self.token_ids)
        ]


def usage(choices: list[ChoiceOutput], prompt_tokens: list[int]) -> dict[str, Any]:
    """OpenAI's token counts: each prompt once (however many choices it has), every output,
    and (`prompt_tokens_details.cached_tokens`) of each prompt, the tokens the prefix cache
    held before the request: its `n` choices are `n` engine requests, and those that started
    after the first one computed the prompt found it cached; the least of their hits is what
    was cached already."""
    prompt = sum(prompt_tokens)
    completion = sum(len(c.token_ids) for c in choices)
    per_prompt = len(choices) // len(prompt_tokens)  # choice i is prompt i // n's
    hits: dict[int, int] = {}
    for choice in choices:
        cached = 0 if choice.metrics is None else choice.metrics.cached_tokens
        which = choice.index // per_prompt
        hits[which] = min(hits.get(which, cached), cached)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(hits.values())},
    }


def so_far(choice: ChoiceOutput, prompt_ids: list[int]) -> dict[str, int]:
    """One streamed choice's token counts so far (vLLM's `continuous_usage_stats`)."""
    prompt, completion = len(prompt_ids), len(choice.token_ids)
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


@dataclass(frozen=True)
class Renderer:
    """Choices in one endpoint's shape: chat's or the legacy completions'."""

    chat: bool
    strings: TokenStrings
    logprobs: bool
    """Whether the request asked for logprobs."""
    tools: ToolCalling | None = None
    """A chat's tool calling: its output becomes tool calls (medha.server.tool_calls)."""
    top_logprobs: int = 0
    """How many alternatives the logprobs name per token (the echoed prompt's are cut to it)."""
    prompt_logprobs: int | None = None
    """The request's `prompt_logprobs` (None: not shown, though computed for an echo)."""
    tokens_as_ids: bool = False
    """Logprobs name tokens `token_id:ID` (`return_tokens_as_token_ids`), not by their text."""
    reasoning: Reasoning | None = None
    """A chat's reasoning parsing (medha.server.reasoning): thinking apart from the answer,
    whose text alone is the content (and the tool calls)."""
    chat_echo: str = ""
    """What a chat's `echo` starts each content with (vLLM's: the last message's)."""

    def whole(self, output: ChoiceOutput, prompt_ids: list[int]) -> dict[str, Any]:
        """A finished choice of a whole (not streamed) response."""
        choice: dict[str, Any] = {"index": output.index}
        finish_reason = output.finish_reason
        rows, offsets = output.rows(), output.text_offsets
        if self.chat:
            choice["message"], finish_reason = self._message(output.text, finish_reason)
        elif output.echo is not None:
            choice["text"] = output.echo.text + output.text
            rows = self._echo_rows(output) + rows
            shift = len(output.echo.text)
            offsets = [*output.echo.offsets, *(shift + offset for offset in offsets)]
        else:
            choice["text"] = output.text
        choice["logprobs"] = self._logprobs(rows, offsets) if self.logprobs else None
        choice["finish_reason"] = finish_reason
        choice["prompt_logprobs"] = self._prompt_logprobs(output, prompt_ids)
        choice["metrics"] = metrics_json(output.metrics)
        return choice

    def _message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole chat choice's message of its output `text`, and its finish reason."""
        reasoning: str | None = None
        content: str | None = text
        if self.reasoning is not None:
            split = self.reasoning.split()
            split.feed(text, finished=True)
            reasoning, content = split.message_parts()
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.tools is not None and content is not None:  # None: thinking alone, no call
            message, parsed = self.tools.message(content)
            finish_reason = self.tools.finish_reason(finish_reason, parsed)
        if reasoning is not None and self.reasoning is not None and self.reasoning.shown:
            message["reasoning"] = reasoning
        if self.chat_echo:
            message["content"] = self.chat_echo + (message["content"] or "")
        return message, finish_reason

    def role(self, index: int) -> dict[str, Any] | None:
        """A chat stream's first chunk of a choice, naming the role (as OpenAI's)."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def echo_chunk(self, index: int) -> dict[str, Any] | None:
        """A chat stream's chunk of a choice's `echo`, after the role's (as vLLM's)."""
        if not self.chat_echo:
            return None
        delta = {"content": self.chat_echo}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def delta(
        self, output: ChoiceOutput, event: TokenEvent, prompt_ids: list[int]
    ) -> dict[str, Any] | None:
        """A streamed chunk's choice for `event` (already added to `output`); None when it
        says nothing (its text is held back: a stop string may be starting)."""
        has_row = self.logprobs and event.token_id is not None
        echo = None if output.echo_sent else output.echo  # with the choice's first chunk
        output.echo_sent = True
        finish_reason = event.finish_reason
        message: dict[str, Any] = {"content": event.text} if event.text else {}
        answer, thinking, answered = output.text, "", True
        if self.reasoning is not None:
            if output.thinking is None:
                output.thinking = self.reasoning.split()
            thinking, new = output.thinking.feed(output.text, finish_reason is not None)
            answer, message = output.thinking.content, {"content": new} if new else {}
            # Thinking alone, ended: no answer, so no call (as a whole response has it).
            answered = finish_reason is None or output.thinking.message_parts()[1] is not None
        if self.tools is not None and answered:
            if output.tool_stream is None:
                output.tool_stream = ToolCallStream(self.tools)
            message = output.tool_stream.delta(answer, finish_reason is not None)
            if output.tool_stream.parsed is not None:
                finish_reason = self.tools.finish_reason(finish_reason, output.tool_stream.parsed)
        if thinking and self.reasoning is not None and self.reasoning.shown:
            message = {"reasoning": thinking, **message}
        shown_prompt = event.prompt_logprobs is not None and self.prompt_logprobs is not None
        if not (message or finish_reason or has_row or shown_prompt or echo):
            return None
        choice: dict[str, Any] = {"index": output.index}
        if self.chat:
            choice["delta"] = message
        else:
            choice["text"] = event.text if echo is None else echo.text + event.text
        rows: Rows = []
        offsets: list[int] = []
        if echo is not None and self.logprobs:
            rows, offsets = self._echo_rows(output), list(echo.offsets)
        if has_row:
            assert event.token_id is not None
            rows.append((event.token_id, event.logprob, event.top_logprobs))
            shift = 0 if output.echo is None else len(output.echo.text)
            offsets.append(shift + output.text_offsets[-1])
        choice["logprobs"] = self._logprobs(rows, offsets) if rows else None
        if shown_prompt:  # on a choice's first event
            choice["prompt_logprobs"] = self._prompt_logprobs(output, prompt_ids)
        choice["finish_reason"] = finish_reason
        if event.finish_reason is not None:
            choice["metrics"] = metrics_json(event.metrics)
        return choice

    def _logprobs(self, rows: Rows, offsets: list[int]) -> dict[str, Any]:
        name = token_id_name if self.tokens_as_ids else self.strings
        if self.chat:
            return chat_logprobs(rows, self.strings, name)
        return completion_logprobs(rows, offsets, name)

    def _echo_rows(self, output: ChoiceOutput) -> Rows:
        assert output.echo is not None
        return prompt_rows(
            output.echo, output.prompt_logprobs, output.prompt_top_logprobs, self.top_logprobs
        )

    def _prompt_logprobs(
        self, output: ChoiceOutput, prompt_ids: list[int]
    ) -> list[dict[str, Any] | None] | None:
        if self.prompt_logprobs is None:
            return None
        return prompt_logprobs_json(output, prompt_ids, self.strings, self.prompt_logprobs)


def completion_logprobs(
    rows: Rows, offsets: list[int], name: Callable[[int], str]
) -> dict[str, Any]:
    """The legacy completions table of `rows`, whose tokens start at `offsets` of the choice's
    text, each token called by `name` (its text, or token_id_name). Its top logprobs hold the
    most likely tokens and the sampled one (as vLLM's), keyed by name: of tokens whose texts
    are the same (bytes of one character each decode to U+FFFD), the most likely is kept."""
    top: list[dict[str, float | None] | None] = []
    for token_id, logprob, alternatives in rows:
        if logprob is None:  # an echoed prompt's first token, which nothing predicts
            top.append(None)
            continue
        table: dict[str, float | None] = {}
        for alternative in alternatives or ():  # most likely first: it keeps a shared text
            table.setdefault(name(alternative.token_id), _finite(alternative.logprob))
        table.setdefault(name(token_id), _finite(logprob))
        top.append(table)
    return {
        "tokens": [name(token_id) for token_id, _, _ in rows],
        "token_logprobs": [_finite(logprob) for _, logprob, _ in rows],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _token_json(
    token_id: int, logprob: float | None, strings: TokenStrings, name: Callable[[int], str]
) -> dict[str, Any]:
    text = strings(token_id)
    return {"token": name(token_id), "logprob": _finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(
    rows: Rows, strings: TokenStrings, name: Callable[[int], str] | None = None
) -> dict[str, Any]:
    """Chat's `logprobs.content`: one object per token, with its most likely alternatives.
    `token` is `name` of the token (by default its text); `bytes` is the UTF-8 of the token's
    text either way (a byte of a multi-byte character: U+FFFD's, as vLLM's)."""
    name = strings if name is None else name
    content = []
    for token_id, logprob, alternatives in rows:
        entry = _token_json(token_id, logprob, strings, name)
        entry["top_logprobs"] = [
            _token_json(t.token_id, t.logprob, strings, name) for t in alternatives or ()
        ]
        content.append(entry)
    return {"content": content}


def prompt_logprobs_json(
    choice: ChoiceOutput, prompt_ids: list[int], strings: TokenStrings, top: int
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob,
    decoded_token}} for the prompt's own token and the `top` most likely ones."""
    if choice.prompt_logprobs is None:
        return None
    rows: list[dict[str, Any] | None] = []
    tops = choice.prompt_top_logprobs or ()
    # strict=False: a request aborted before its first token has scored part of its prompt.
    scored = zip(prompt_ids, choice.prompt_logprobs, strict=False)
    for position, (token_id, logprob) in enumerate(scored):
        if logprob is None:
            rows.append(None)
            continue
        row = {str(token_id): {"logprob": _finite(logprob), "decoded_token": strings(token_id)}}
        for alternative in ((tops[position] if position < len(tops) else None) or ())[:top]:
            row.setdefault(
                str(alternative.token_id),
                {
                    "logprob": _finite(alternative.logprob),
                    "decoded_token": strings(alternative.token_id),
                },
            )
        rows.append(row)
    return rows
