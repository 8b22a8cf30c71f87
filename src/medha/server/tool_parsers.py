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
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

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
    no parser for (vLLM's `--tool-parser-plugin`): two pure functions of the output text."""

    def extract(self, text: str) -> ParsedOutput:
        """A finished output's content and calls (no calls: the text is all content)."""

    def held_from(self, text: str) -> int:
        """Where, in the output streamed so far, text starts that may become a call."""


def _call(value: object, arguments_key: str) -> FunctionCall | None:
    """A call from a decoded JSON object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return FunctionCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _not_called(text: str) -> ParsedOutput:
    return ParsedOutput(text, ())


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the last may be
    unclosed (the model ended, or hit a stop string, before writing `</tool_call>`)."""

    name: ClassVar[str] = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def extract(self, text: str) -> ParsedOutput:
        if self.START not in text:
            return _not_called(text)
        calls = []
        outside = []  # the text between and around the blocks
        position = 0
        for block in self._BLOCK.finditer(text):
            outside.append(text[position : block.start()])
            position = block.end()
            try:
                call = _call(json.loads(block.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return _not_called(text)
            calls.append(call)
        outside.append(text[position:])
        content = "".join(outside)
        return ParsedOutput(content if content.strip() else None, tuple(calls))

    def held_from(self, text: str) -> int:
        start = text.find(self.START)
        if start >= 0:
            return start
        # A marker may be starting at the end: hold its first characters back.
        for length in range(min(len(self.START) - 1, len(text)), 0, -1):
            if text.endswith(self.START[:length]):
                return len(text) - length
        return len(text)


class Llama3JsonParser:
    """Llama 3.1's JSON-based calls: the output is one `{"name": ..., "parameters": {...}}`
    object or several separated by `;` (`<|python_tag|>` before them, where the tokenizer keeps
    it, is allowed; `arguments` is taken for `parameters`, as vLLM takes it)."""

    name: ClassVar[str] = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    _decoder = json.JSONDecoder()

    def extract(self, text: str) -> ParsedOutput:
        body = text.strip()
        body = body.removeprefix(self.PYTHON_TAG).lstrip()
        if not body.startswith("{"):
            return _not_called(text)
        calls = []
        position = 0
        while position < len(body):
            try:
                value, position = self._decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return _not_called(text)
            named = isinstance(value, dict) and "parameters" in value
            call = _call(value, "parameters" if named else "arguments")
            if call is None:
                return _not_called(text)
            calls.append(call)
            position = _skip_separator(body, position)
        return ParsedOutput(None, tuple(calls))

    def held_from(self, text: str) -> int:
        begun = text.lstrip()
        if not begun or begun.startswith("{") or self.PYTHON_TAG.startswith(begun[:14]):
            return 0  # nothing yet, or a call (or its tag) is starting: all of it may be one
        return len(text)


def _skip_separator(body: str, position: int) -> int:
    """Past the whitespace and one `;` between two calls."""
    while position < len(body) and body[position].isspace():
        position += 1
    if position < len(body) and body[position] == ";":
        position += 1
    while position < len(body) and body[position].isspace():
        position += 1
    return position


PARSERS: dict[str, type[HermesParser] | type[Llama3JsonParser]] = {
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
    parser: Any = PARSERS[name]()
    marker = getattr(parser, "START", None)
    if marker is not None:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in tokenizer.special_token_ids:
            raise ValueError(
                f"the {name} parser looks for {marker} in the output text, which this "
                "tokenizer marks special and medha leaves out of the text"
            )
    return parser  # type: ignore[no-any-return]
