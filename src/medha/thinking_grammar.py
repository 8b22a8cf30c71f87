"""A constrained output that a reasoning model may think before (StructuredOutputsParams.thinking):
the request's grammar, after free text between the thinking tags.

Both are one llguidance grammar, so the scheduler actor keeps one matcher per request as for
any structured output: a Lark grammar that reads the thinking, then the constraint as a
sub-grammar. A sub-grammar has a lexer of its own, so the constraint (a JSON schema's
whitespace rules, a user's Lark `%ignore`) means what it means without thinking.

A tag is read as text, or, where the vocabulary has it as one added token (which llguidance
counts as special), as that token. Qwen 3's and DeepSeek-R1's `<think>` and `</think>` are such
tokens (added to the vocabulary, not special to the tokenizer): llguidance never reads added
tokens as their text, so a text tag could only be spelled out in pieces, which these models
never do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from medha.structured_outputs import Thinking

_CONSTRAINT = "medha_constraint"
"""The constraint's sub-grammar, unless its grammar is named already."""


def with_thinking(
    constraint: str, thinking: Thinking, tag_token: Callable[[str], int | None]
) -> str:
    """The llguidance grammar `constraint` (Lark text, or a grammar list as JSON text) after
    the thinking `thinking` allows. `tag_token`: the token a tag is, else None (read as text)."""
    grammars = _grammar_list(constraint)
    if any("%llguidance" in str(g.get("lark_grammar") or "") for g in grammars):
        # Options of the whole grammar: as a sub-grammar, the constraint would lose them.
        raise ValueError("a grammar with %llguidance options cannot follow thinking")
    name = grammars[0].get("name") or _CONSTRAINT
    grammars[0] = {**grammars[0], "name": name}
    start, end = (tag_token(tag) for tag in (thinking.start, thinking.end))
    start_tag = _literal(thinking.start) if start is None else f"<[{start}]>"
    if end is None:
        # Lazy, up to and with the first end tag: the thinking cannot hold one.
        thought = f"thinking[suffix={_literal(thinking.end)}]: /(?s:.*)/"
    else:
        # Text up to the end token; the tag spelled out in pieces is not allowed in it, so
        # that the grammar and a parser of the text agree on where the thinking ends.
        thought = (
            f"thinking: THOUGHT <[{end}]>\n"
            "THOUGHT: /(?s:.*)/ & ~WITH_END\n"
            f"WITH_END: /(?s:.*)/ {_literal(thinking.end)} /(?s:.*)/"
        )
    head = f"{start_tag}? thinking" if thinking.opened else f"({start_tag} thinking)?"
    lark = f"start: {head} @{name}\n{thought}\n"
    return json.dumps({"grammars": [{"lark_grammar": lark}, *grammars]}, ensure_ascii=False)


def _grammar_list(grammar: str) -> list[dict[str, Any]]:
    """An llguidance grammar's list of grammars (Lark text is a list of one)."""
    if grammar.lstrip().startswith("{"):
        try:
            parsed = json.loads(grammar)
        except RecursionError:  # nested deeper than Python's parser goes (llguidance's does)
            raise ValueError("the JSON grammar is nested too deeply") from None
        grammars = parsed.get("grammars") if isinstance(parsed, dict) else None
        if not (grammars and isinstance(grammars, list)) or not all(
            isinstance(g, dict) for g in grammars
        ):
            raise ValueError(
                'a JSON grammar must be an object with "grammars": a non-empty list of objects'
            )
        options = sorted(key for key, value in parsed.items() if key != "grammars" and value)
        if options:  # max_tokens: the wrapper's would bound the thinking too
            raise ValueError(f"a grammar with {', '.join(options)} cannot follow thinking")
        return list(grammars)
    return [{"lark_grammar": grammar}]


def _literal(text: str) -> str:
    """`text` as a Lark string literal (which takes JSON's escapes): JSON's, and every other
    character that is not printable escaped too (Lark's lexer refuses DEL)."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() or ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in quoted)
