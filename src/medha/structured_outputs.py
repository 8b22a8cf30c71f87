"""StructuredOutputsParams: constrain a request's output to a JSON schema, a regex, a choice or a
grammar (vLLM's `StructuredOutputsParams`, formerly `GuidedDecodingParams`).

Pure Python (no torch, no grammar engine): it only checks and normalises what the caller gave,
so a request is refused before it is queued. `medha.grammar` compiles it for the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal, NoReturn, TypeVar

from medha.errors import InvalidSamplingParamsError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")

_Params = TypeVar("_Params", "Thinking", "StructuredOutputsParams")


@dataclass(frozen=True, slots=True)
class Thinking:
    """Lets a reasoning model think before its constrained output (medha's, where vLLM's
    `--reasoning-parser` starts the grammar after the thinking).

    The output may be free text between `start` and `end` first; the constraint holds from
    just after `end`. The thinking may not contain `end` (it ends at the first one). A tag that
    is one added token of the vocabulary (Qwen 3's and DeepSeek-R1's `<think>`) must be written
    as that token; other tags are text (one that holds an added token and more is refused).

    Attributes:
        start, end: the tags around the thinking (DeepSeek-R1's and Qwen 3's by default).
        opened: the output starts inside the thinking, as after a chat template that ends the
            prompt with `start` (DeepSeek-R1's); it may still write `start` first. Else it
            either starts with `start` or is the constrained output from its first token.
    """

    start: str = "<think>"
    end: str = "</think>"
    opened: bool = False

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                _fail(f"thinking.{name}", value, "must be a non-empty str")
        if self.start == self.end:
            _fail("thinking.end", self.end, "must differ from thinking.start")
        if not isinstance(self.opened, bool):
            _fail("thinking.opened", self.opened, "must be a bool")

    @classmethod
    def coerce(cls, value: object) -> Thinking:
        """`value` itself, or a mapping of its fields."""
        return _coerced(cls, value, "StructuredOutputsParams.thinking", ", or False")


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Exactly one constraint on what a request may generate.

    Attributes:
        json: a JSON schema (a dict, or its JSON text): the output is one JSON value valid
            under it. Stored as compact JSON text, keys in the order given: an object's
            properties are generated in the schema's order (put the reasoning before the
            answer, and the model writes it first).
        regex: the output matches this regular expression as a whole (Rust `regex` syntax,
            which is Python's for everything but look-around and back-references).
        choice: the output is exactly one of these strings (not empty; stored as a tuple).
        grammar: a context-free grammar in llguidance's Lark syntax; rule `start` is the
            output (`start: "yes" | "no"`; terminals may be /regexes/).
        json_object: True: the output is any JSON object (the OpenAI API's
            `response_format={"type": "json_object"}`).
        disable_any_whitespace: JSON only: no whitespace between tokens of the JSON, so the
            model cannot spend its tokens on indentation. vLLM's default allows it.
        thinking: a Thinking: the model may think first, and the constraint holds after it.
            None: the constraint holds from the first token, unless a server's reasoning
            parser sets a Thinking (`medha serve --reasoning-parser` does, from the prompt).
            False: from the first token whatever the server (a grammar that writes the
            thinking itself, to bound it, say).

    The request ends ("stop") as soon as its output completes the constraint and nothing more
    could follow; where more could (a regex such as `a+`), the model may also end it with eos.
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    thinking: Thinking | Literal[False] | None = None

    def __post_init__(self) -> None:
        normalise = partial(object.__setattr__, self)
        if self.json is not None:
            normalise("json", _schema_text(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(name, value, "must be a non-empty str")
        if self.choice is not None:
            normalise("choice", _choices(self.choice))
        if self.json_object is None:  # vLLM's default for it
            normalise("json_object", False)
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        if self.thinking is not None and self.thinking is not False:
            normalise("thinking", Thinking.coerce(self.thinking))
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidSamplingParamsError(
                "StructuredOutputsParams takes exactly one of json, regex, choice, grammar and "
                f"json_object; got {', '.join(given) if given else 'none'}"
            )

    @property
    def kind(self) -> str:
        """Which constraint it is: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    @classmethod
    def coerce(cls, value: object) -> StructuredOutputsParams:
        """`value` itself, or a mapping of its fields (as a JSON request body gives them)."""
        if isinstance(value, Mapping):  # vLLM's fields medha lacks, at values that ask nothing
            value = {k: v for k, v in value.items() if _VLLM_UNUSED.get(k, ...) is not v}
        return _coerced(cls, value, "SamplingParams.structured_outputs")


_VLLM_UNUSED: dict[str, object] = {
    "whitespace_pattern": None,
    "disable_fallback": False,
    "disable_additional_properties": False,
    "structural_tag": None,
    "_backend": None,
    "_backend_was_auto": False,
}
"""vLLM's StructuredOutputsParams fields that medha does not have, with the value that leaves
them unused, which a client serialising vLLM's dataclass sends (any other is refused)."""


def _coerced(cls: type[_Params], value: object, name: str, or_else: str = "") -> _Params:
    """`value` if it is a `cls`, else a `cls` of the mapping `value`'s fields (`name`: what
    errors call it; `or_else`: what else the caller takes)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise InvalidSamplingParamsError(
            f"{name} must be a medha.{cls.__name__} (or a dict of its fields){or_else}, got "
            f"{type(value).__name__}"
        )
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # cls is a dataclass
    unknown = sorted(str(key) for key in value if key not in known)
    if unknown:
        raise InvalidSamplingParamsError(
            f"{name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**value)


def _fail(field: str, value: object, problem: str) -> NoReturn:
    raise InvalidSamplingParamsError(f"StructuredOutputsParams.{field}={value!r}: {problem}")


def _too_deep() -> NoReturn:
    # Without the value: its repr would recurse as deep.
    raise InvalidSamplingParamsError("StructuredOutputsParams.json is nested too deeply") from None


def _schema_text(schema: object) -> str:
    if isinstance(schema, str):
        try:
            parsed: Any = json.loads(schema)
        except json.JSONDecodeError as exc:
            _fail("json", schema, f"is not valid JSON ({exc})")
        except RecursionError:
            _too_deep()
    elif isinstance(schema, Mapping):
        parsed = schema
    else:
        _fail("json", schema, "must be a JSON schema: a dict, or its JSON text")
    # A schema is an object; `true` (anything) is one too, but says nothing a caller means.
    if not isinstance(parsed, Mapping):
        _fail("json", schema, "must be a JSON object (a schema)")
    try:
        return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        _fail("json", schema, f"cannot be written as JSON ({exc})")
    except RecursionError:
        _too_deep()


def _choices(choice: object) -> tuple[str, ...]:
    if isinstance(choice, str) or not isinstance(choice, list | tuple):
        _fail("choice", choice, "must be a list/tuple of str")
    if not choice:
        _fail("choice", choice, "must not be empty")
    for item in choice:
        if not isinstance(item, str) or not item:
            _fail("choice", choice, "every choice must be a non-empty str")
    return tuple(choice)
