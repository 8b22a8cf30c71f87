"""A reasoning model's thinking apart from its answer: vLLM's `--reasoning-parser`.

Models such as DeepSeek-R1 and Qwen 3 think between `<think>` and `</think>` before they
answer. With a reasoning parser, a chat choice's `message.reasoning` (vLLM's field, formerly
`reasoning_content`) holds the thinking and `content` the answer; streamed, the thinking goes out
in `delta.reasoning`, the answer in `delta.content`, and tool calls are read from the answer.

An output that starts with `<think>` (after whitespace) thinks. Where one that does not is,
the prompt says, so that a stream and a whole response agree from the first token: a chat
template that ends the prompt with `<think>` (DeepSeek-R1's, Qwen3-Thinking-2507's) has the
model think from its first token, and one that ends it with an empty `<think></think>` (Qwen 3's
`enable_thinking: false`) has it answer; an assistant message continued
(`continue_final_message`) goes by its turn's last tag as rendered: mid-thought ("<think>Let
me think") it goes on thinking, after a template's `</think>` it answers. After a
prompt with neither, it is the answer (`qwen3`) or thinking (`deepseek_r1`, whose first models
thought without writing the tag). A tag elsewhere in the prompt (a user's message, an earlier
turn) says nothing.
Thinking ends at the first `</think>`, and everything after it is the answer; an output that
never writes it (cut short by max_tokens) is all thinking.

A constrained output (structured outputs, a named or required tool call) may think first as
well, where the prompt lets it: its grammar holds from the end of the thinking, so the answer
is what the constraint asks for (as vLLM starts the grammar after the thinking). Medha reads
the thinking with the grammar (StructuredOutputsParams.thinking), so the tags and where the
output starts mean the same there as here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Literal

from medha.errors import InvalidRequestError
from medha.sampling import SamplingParams
from medha.structured_outputs import Thinking

if TYPE_CHECKING:
    from medha.model.tokenizer import Tokenizer


class OutputPart(Enum):
    """Where an output's text is being read: thinking, answer, or not known yet."""

    UNDECIDED = "undecided"
    """The output so far may still be the start tag (or whitespace before it)."""
    REASONING = "reasoning"
    CONTENT = "content"


@dataclass(frozen=True)
class ReasoningParser:
    """Where a model writes its thinking: between `start` and `end`."""

    untagged_is_reasoning: bool
    """An output whose prompt has no tag and which writes no start tag thinks first."""
    start: str = "<think>"
    end: str = "</think>"

    def untagged_output(self, prompt_tail: str, continued: str | None = None) -> OutputPart:
        """Where an output that does not start with the start tag is, after a prompt that
        ends with `prompt_tail`, or that continues an assistant message whose turn, as
        rendered, ends with `continued` (`continue_final_message`; an output that starts with
        the start tag thinks)."""
        said = self._prompt_says(prompt_tail, continued)
        if said is not None:
            return said
        return OutputPart.REASONING if self.untagged_is_reasoning else OutputPart.CONTENT

    def thinking(self, prompt_tail: str, continued: str | None = None) -> Thinking | None:
        """The thinking a constrained output may do first, after such a prompt; None where
        the prompt has closed it (the output is the answer)."""
        if self._prompt_says(prompt_tail, continued) is OutputPart.CONTENT:
            return None
        opened = self.untagged_output(prompt_tail, continued) is OutputPart.REASONING
        return Thinking(self.start, self.end, opened=opened)

    def _prompt_says(self, prompt_tail: str, continued: str | None) -> OutputPart | None:
        """Where the prompt leaves the output: thinking if it opened the thinking, the answer
        if it closed it, None if it says neither. A template's tag ends the prompt (a tag in
        a user's message or an earlier turn says nothing); an assistant message continued
        mid-thought ("<think>Let me think") leaves its last tag open, text after it or not."""
        if continued is not None:
            start, end = continued.rfind(self.start), continued.rfind(self.end)
            if start >= 0 or end >= 0:
                # Of two tags ending together (one the end of the other), the start is last.
                closed = end >= 0 and end + len(self.end) > start + len(self.start)
                return OutputPart.CONTENT if closed else OutputPart.REASONING
        tail = prompt_tail.rstrip()
        if tail.endswith(self.start):
            return OutputPart.REASONING
        if tail.endswith(self.end):
            return OutputPart.CONTENT
        return None


REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser(untagged_is_reasoning=True),
    "qwen3": ReasoningParser(untagged_is_reasoning=False),
}
"""vLLM's names of the parsers medha has."""


def reasoning_parser(parser: str | ReasoningParser, tokenizer: Tokenizer) -> ReasoningParser:
    """A parser by vLLM's name, or the one given, for a model with `tokenizer`. ValueError for
    a name medha lacks, and for tags the tokenizer drops from output text as special tokens
    (the output is decoded without them by default): the parser would never see them."""
    if isinstance(parser, str):
        if parser not in REASONING_PARSERS:
            known = ", ".join(sorted(REASONING_PARSERS))
            raise ValueError(f"no reasoning parser {parser!r} (medha has: {known})")
        parser = REASONING_PARSERS[parser]
    for tag in (parser.start, parser.end):
        if tokenizer.is_special(tag):
            raise ValueError(
                f"the reasoning parser looks for {tag} in the output text, which this "
                "model's tokenizer leaves out of it as a special token"
            )
    return parser


def thinking_first(params: SamplingParams, thinking: Thinking | None) -> SamplingParams:
    """`params`, whose structured output (if any) may now follow `thinking` (a request that
    says how it thinks keeps its own)."""
    structured = params.structured_outputs
    if structured is None or thinking is None or structured.thinking is not None:
        return params
    return replace(params, structured_outputs=replace(structured, thinking=thinking))


PROMPT_TAIL = 16
"""Tokens of a chat's prompt whose text tells whether the template opened (or closed) the
model's thinking."""

TAG_ROOM = 12
"""Characters before a continued assistant message's text where its template may have put a
thinking tag (`</think>\n\n`), read with the message."""


def chat_reasoning(
    parser: ReasoningParser,
    tokenizer: Tokenizer,
    prompt: tuple[str, list[int]],
    params: SamplingParams,
    shown: bool,
    continued_message: str | None,
) -> tuple[SamplingParams, Reasoning]:
    """A chat's reasoning parsing, and its `params` with a constrained output thinking first
    where the prompt lets it (thinking_first). `prompt`: its text as rendered, and its ids;
    `continued_message`: the text of the assistant message it goes on with
    (continue_final_message), else None."""
    text, ids = prompt
    tail = tokenizer.decode(ids[-PROMPT_TAIL:], skip_special_tokens=False)
    continued = None
    if continued_message is not None:
        # The turn as rendered: a template may write the thinking's tags before the
        # message's text (Qwen 3's `<think>...</think>` from reasoning_content).
        message = continued_message.strip()
        continued = text[-(len(message) + TAG_ROOM) :] if message else ""
    params = thinking_first(params, parser.thinking(tail, continued))
    structured = params.structured_outputs
    thinking = None if structured is None else structured.thinking
    return params, Reasoning.of(parser, tail, shown, thinking, continued)


@dataclass(frozen=True)
class Reasoning:
    """One chat request's reasoning parsing: where its output starts, and whether the
    thinking is shown (vLLM's `include_reasoning`)."""

    parser: ReasoningParser
    untagged: OutputPart
    """Where an output that does not start with the start tag is."""
    shown: bool = True

    @classmethod
    def of(
        cls,
        parser: ReasoningParser,
        prompt_tail: str,
        shown: bool,
        thinking: Thinking | Literal[False] | None = None,
        continued: str | None = None,
    ) -> Reasoning:
        """`thinking`: the request's structured output's (after thinking_first), which says
        where a constrained output starts; None: the prompt says (`continued`: see
        ReasoningParser.untagged_output). InvalidRequestError for a
        request's own thinking tags that are not the parser's."""
        if thinking is None:
            return cls(parser, parser.untagged_output(prompt_tail, continued), shown)
        if thinking is False:  # the grammar holds from the first token
            return cls(parser, OutputPart.CONTENT, shown)
        if (thinking.start, thinking.end) != (parser.start, parser.end):
            raise InvalidRequestError(
                f"structured_outputs.thinking's tags {thinking.start!r}, {thinking.end!r} are "
                f"not the reasoning parser's ({parser.start!r}, {parser.end!r})"
            )
        opened = thinking.opened
        return cls(parser, OutputPart.REASONING if opened else OutputPart.CONTENT, shown)

    def split(self) -> ThinkingSplit:
        return ThinkingSplit(self.parser, self.untagged)


@dataclass
class ThinkingSplit:
    """One choice's output text, read as it grows: its thinking and its answer so far."""

    parser: ReasoningParser
    untagged: OutputPart
    """Where the output is if it does not start with the start tag."""
    part: OutputPart = OutputPart.UNDECIDED
    read: int = 0
    """Characters of the output read (text that may be the start of a tag is not)."""
    reasoning: str = ""
    content: str = ""
    thought: bool = False
    """The output has a thinking part (maybe empty)."""

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        """Read the output `text` so far (`finished`: all of it): the thinking and the answer
        it adds."""
        had_reasoning, had_content = len(self.reasoning), len(self.content)
        # A part only ever gives way to a later one: undecided, thinking, answer.
        if self.part is OutputPart.UNDECIDED:
            self._decide(text, finished)
        if self.part is OutputPart.REASONING:
            self._read_reasoning(text, finished)
        if self.part is OutputPart.CONTENT:
            self.content += text[self.read :]
            self.read = len(text)
        return self.reasoning[had_reasoning:], self.content[had_content:]

    def _decide(self, text: str, finished: bool) -> None:
        """Whether the output starts with the start tag, once its text tells."""
        head = text[self.read :]
        stripped = head.lstrip()
        start = self.parser.start
        if stripped.startswith(start):
            self.read += len(head) - len(stripped) + len(start)
            self.part, self.thought = OutputPart.REASONING, True
        elif finished or not start.startswith(stripped):
            self.part = self.untagged
            self.thought = self.untagged is OutputPart.REASONING

    def _read_reasoning(self, text: str, finished: bool) -> None:
        """Thinking up to the end tag (a possible start of it is held back)."""
        end = self.parser.end
        at = text.find(end, self.read)
        if at >= 0:
            self.reasoning += text[self.read : at]
            self.read = at + len(end)
            self.part = OutputPart.CONTENT
            return
        upto = len(text) if finished else len(text) - _tag_start(text, end, self.read)
        self.reasoning += text[self.read : upto]
        self.read = upto

    def message_parts(self) -> tuple[str | None, str | None]:
        """A whole response's (reasoning, content), as vLLM has them: no reasoning without a
        thinking part; no content (None) after thinking that nothing followed."""
        if not self.thought:
            return None, self.content
        return self.reasoning, self.content or None


def _tag_start(text: str, tag: str, since: int) -> int:
    """The length of the longest end of `text[since:]` that begins `tag` (held back: the
    next text may complete it)."""
    longest = min(len(tag) - 1, len(text) - since)
    for length in range(longest, 0, -1):
        if tag.startswith(text[len(text) - length :]):
            return length
    return 0
