"""Tool-call parsers: where a model that chose to call tools wrote the calls in its output text.

`tool_choice: "auto"` leaves the choice to the model, which writes calls in its own format;
the server's parser (`medha serve --tool-call-parser NAME`, vLLM's names) finds them:

- `hermes` (Hermes 2 Pro and later, Qwen 2.5 and 3): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>` blocks, after any text, which is the message's content;
- `llama3_json` (Llama 3.1 and later, JSON-based tool calling): the whole output is
  `{"name": ..., "parameters": {...}}`, or several such objects separated by `;`.

Output that is not a well-formed call in the format is the message's content, whole: a model
that half-writes a call has not called anything. Each parser also says, for a stream, from where
the text seen so far might be a call (`held_from`): the text before it can be sent as content
at once, the rest waits until the model ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from medha.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class FunctionCall:
    """One call a model made: the function's name and its arguments as JSON text (OpenAI's
    `function.arguments` is a string)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    """The text that is not a call; None when there is none (OpenAI's `content: null`)."""
    calls: tuple[FunctionCall, ...]


class ToolCallParser(Protocol):
    """What `create_app(..., tool_call_parser=...)` takes for a model whose format medha has
    no parser for (vLLM's `--tool-parser-plugin`): two pure functions of the output text.

    A stream sends `text[:held_from(text)]` as content while the model writes, so the content
    `extract` finds in the finished output must start with what `held_from` let out of every
    earlier text: hold back whatever might yet turn out to be a call, or not be content.
    """

    def extract(self, text: str) -> ParsedOutput:
        """A finished output's content and calls (no calls: the text is all content)."""

    def held_from(self, text: str) -> int:
        """Where, in the output streamed so far, text starts that may become a call."""


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def decode_json(text: str, position: int = 0) -> tuple[object, int]:
    """The JSON value at `position` of `text`, and where it ends; ValueError if there is none.
    Strict JSON: Python's decoder takes NaN and Infinity, which a client's JSON does not."""
    try:
        return _DECODER.raw_decode(text, position)
    except RecursionError as exc:  # a model can nest brackets deeper than Python recurses
        raise ValueError("nested too deeply") from exc


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def read_call(value: object, arguments_key: str) -> FunctionCall | None:
    """A call from a decoded JSON object, or None if it is not one. An object of a name alone
    calls a function of no arguments; with other keys but no arguments, it is data that
    happens to have a name (`{"name": "Ada", "age": 36}`), not a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if arguments_key not in value and len(value) > 1:
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    try:  # 1e400 decodes to inf, which is not JSON to write back
        text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # "\ud83d" decodes to a lone surrogate: written back escaped
            text = json.dumps(arguments, allow_nan=False)
    return FunctionCall(value["name"], text)


def _not_called(text: str) -> ParsedOutput:
    return ParsedOutput(text, ())


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the last may be
    unclosed (the model ended, or hit a stop string, before writing `</tool_call>`). The text
    around the blocks is the content, unless it is only whitespace."""

    name: ClassVar[str] = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"

    def extract(self, text: str) -> ParsedOutput:
        calls = []
        outside = []  # the text between and around the blocks
        position = 0
        while (start := text.find(self.START, position)) >= 0:
            outside.append(text[position:start])
            try:  # the object itself, not up to the next END: an argument may contain END
                value, end = decode_json(text, _skip_space(text, start + len(self.START)))
            except ValueError:
                return _not_called(text)
            call = read_call(value, "arguments")
            if call is None:
                return _not_called(text)
            calls.append(call)
            end = _skip_space(text, end)
            if text.startswith(self.END, end):
                position = end + len(self.END)
            elif end == len(text):
                position = end
            else:
                return _not_called(text)  # something else inside the block
        if not calls:
            return _not_called(text)
        outside.append(text[position:])
        content = "".join(outside)
        return ParsedOutput(content if content.strip() else None, tuple(calls))

    def held_from(self, text: str) -> int:
        held = text.find(self.START)
        if held < 0:
            held = len(text)
            # A marker may be starting at the end: hold its first characters back.
            for length in range(min(len(self.START) - 1, len(text)), 0, -1):
                if text.endswith(self.START[:length]):
                    held = len(text) - length
                    break
        # Whitespace alone before a call is no content (extract's None): hold it too.
        return held if text[:held].strip() else 0


class Llama3JsonParser:
    """Llama 3.1's JSON-based calls: the output is one `{"name": ..., "parameters": {...}}`
    object or several separated by `;` (`<|python_tag|>` before them, where the tokenizer keeps
    it, is allowed; `arguments` is taken for `parameters`, as vLLM takes it)."""

    name: ClassVar[str] = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def extract(self, text: str) -> ParsedOutput:
        body = text.strip()
        body = body.removeprefix(self.PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return _not_called(text)
        calls = []
        position = 0
        while position < len(body):
            try:
                value, position = decode_json(body, position)
            except ValueError:
                return _not_called(text)
            named = isinstance(value, dict) and "parameters" in value
            call = read_call(value, "parameters" if named else "arguments")
            if call is None:
                return _not_called(text)
            calls.append(call)
            position = _skip_separator(body, position)
        return ParsedOutput(None, tuple(calls))

    def held_from(self, text: str) -> int:
        begun = text.lstrip()
        if begun.startswith("{") or self.PYTHON_TAG.startswith(begun[:14]):  # "" too
            return 0  # nothing yet, or a call (or its tag) is starting: all of it may be one
        return len(text)


def _skip_separator(body: str, position: int) -> int:
    """Past the whitespace and one `;` between two calls."""
    position = _skip_space(body, position)
    if position < len(body) and body[position] == ";":
        position += 1
    return _skip_space(body, position)


PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    HermesParser.name: HermesParser,
    Llama3JsonParser.name: Llama3JsonParser,
}
"""The parsers by their vLLM names (`--tool-call-parser`)."""


def tool_call_parser(name: str, tokenizer: Tokenizer) -> ToolCallParser:
    """The parser `name`, for a model with `tokenizer`. ValueError for a name medha lacks, and
    for a format whose marker the tokenizer drops from output text as a special token (medha
    decodes without special tokens): the parser would never see a call."""
    if name not in PARSERS:
        raise ValueError(f"no tool-call parser {name!r}; medha has {', '.join(sorted(PARSERS))}")
    parser = PARSERS[name]()
    marker = getattr(parser, "START", None)
    if marker is not None and tokenizer.is_special(marker):
        raise ValueError(
            f"the {name} parser looks for {marker} in the output text, which this "
            "tokenizer marks special and medha leaves out of the text"
        )
    return parser
