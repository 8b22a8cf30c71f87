"""Tool-call parsers and the tool-call stream, without a model: what `hermes` and `llama3_json`
read from an output, and that a streamed choice's deltas add up to its whole message however
the output arrives."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from medha.server.tool_calls import ToolCalling, ToolCallStream
from medha.server.tool_parsers import (
    FunctionCall,
    HermesParser,
    Llama3JsonParser,
    ParsedOutput,
    tool_call_parser,
)

WEATHER = FunctionCall("get_weather", '{"city": "Paris"}')
TIME = FunctionCall("get_time", "{}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Just text.", ParsedOutput("Just text.", ())),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            ParsedOutput(None, (WEATHER,)),
        ),
        (  # text before, two calls, the last unclosed (a stop string cut it)
            'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '</tool_call>\n<tool_call>{"name": "get_time"}',
            ParsedOutput("Let me look. \n", (WEATHER, TIME)),
        ),
        (  # text around the calls is kept, in order
            'A<tool_call>{"name": "get_time", "arguments": {}}</tool_call>B',
            ParsedOutput("AB", (TIME,)),
        ),
        (  # a half-written call is no call: all of it is content
            'Sure <tool_call>{"name": "get_weather", "argu',
            ParsedOutput('Sure <tool_call>{"name": "get_weather", "argu', ()),
        ),
        (
            '<tool_call>{"name": "f", "arguments": "not an object"}</tool_call>',
            ParsedOutput('<tool_call>{"name": "f", "arguments": "not an object"}</tool_call>', ()),
        ),
        (
            '<tool_call>["get_time"]</tool_call>',
            ParsedOutput('<tool_call>["get_time"]</tool_call>', ()),
        ),
        (  # the end marker inside an argument is the argument's
            '<tool_call>{"name": "say", "arguments": {"text": "</tool_call>"}}</tool_call>',
            ParsedOutput(None, (FunctionCall("say", '{"text": "</tool_call>"}'),)),
        ),
        (  # whitespace alone around the calls is no content
            '\n<tool_call>{"name": "get_time"}</tool_call>\n<tool_call>{"name": "get_time"}',
            ParsedOutput(None, (TIME, TIME)),
        ),
        (  # one block that is no call makes none of them calls
            '<tool_call>{"name": "get_time"}</tool_call><tool_call>["x"]</tool_call>',
            ParsedOutput(
                '<tool_call>{"name": "get_time"}</tool_call><tool_call>["x"]</tool_call>', ()
            ),
        ),
        (  # something else inside a block
            '<tool_call>{"name": "get_time"} and more</tool_call>',
            ParsedOutput('<tool_call>{"name": "get_time"} and more</tool_call>', ()),
        ),
        (  # other keys but no arguments: data with a name, not a call
            '<tool_call>{"name": "get_time", "when": "now"}</tool_call>',
            ParsedOutput('<tool_call>{"name": "get_time", "when": "now"}</tool_call>', ()),
        ),
        (  # arguments keep non-ASCII text as it is
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>',
            ParsedOutput(None, (FunctionCall("get_weather", '{"city": "Zürich"}'),)),
        ),
    ],
)
def test_hermes_reads_tool_call_blocks(text: str, expected: ParsedOutput) -> None:
    assert HermesParser().extract(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The weather is fine.", ParsedOutput("The weather is fine.", ())),
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            ParsedOutput(None, (WEATHER,)),
        ),
        (  # the python tag (where kept), "arguments" for "parameters", several calls
            '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {}}',
            ParsedOutput(None, (WEATHER, TIME)),
        ),
        (
            ' \n{"name": "get_time"}\n',
            ParsedOutput(None, (TIME,)),
        ),
        (  # JSON that is not a call, and a call with text after it, are content
            '{"answer": 42}',
            ParsedOutput('{"answer": 42}', ()),
        ),
        (
            '{"name": "get_time", "parameters": {}} and then some',
            ParsedOutput('{"name": "get_time", "parameters": {}} and then some', ()),
        ),
        ('{"name": "get_time"}; 5', ParsedOutput('{"name": "get_time"}; 5', ())),
        ('{"name": "Ada", "age": 36}', ParsedOutput('{"name": "Ada", "age": 36}', ())),
        ('{"name": "get_ti', ParsedOutput('{"name": "get_ti', ())),
    ],
)
def test_llama3_json_reads_whole_output_calls(text: str, expected: ParsedOutput) -> None:
    assert Llama3JsonParser().extract(text) == expected


NOT_JSON = [
    '{"name": "f", "arguments": {"x": NaN}}',  # Python's decoder takes these; JSON has none
    '{"name": "f", "arguments": {"x": Infinity}}',
    '{"name": "f", "arguments": {"x": 1e400}}',  # decodes to inf, which JSON cannot write
    '{"name": "f", "arguments": ' + "[" * 5000 + "]" * 5000 + "}",  # deeper than Python
    '{"name": "f", "arguments": {}, "note": NaN}',  # anywhere in the call
]


@pytest.mark.parametrize("call", NOT_JSON)
def test_a_call_json_cannot_carry_is_no_call(call: str) -> None:
    hermes = f"<tool_call>{call}</tool_call>"
    assert HermesParser().extract(hermes) == ParsedOutput(hermes, ())
    llama = call.replace('"arguments"', '"parameters"')
    assert Llama3JsonParser().extract(llama) == ParsedOutput(llama, ())
    required = f"[{llama}]"
    assert ToolCalling("required").parse(required) == ParsedOutput(required, ())


def test_arguments_holding_a_lone_surrogate_stay_an_escape() -> None:
    """A JSON escape a model can write, such as "\\ud83d", decodes to a lone surrogate, which
    UTF-8 cannot carry: written back unescaped, the whole response failed to encode (a 500)."""
    for escape in ("\\ud83d", "\\udc00"):
        call = '{"name": "f", "arguments": {"x": "' + escape + '", "y": "é"}}'
        (hermes,) = HermesParser().extract(f"<tool_call>{call}</tool_call>").calls
        llama = Llama3JsonParser().extract(call.replace('"arguments"', '"parameters"'))
        assert llama.calls == (hermes,)
        hermes.arguments.encode("utf-8")
        assert json.loads(hermes.arguments) == json.loads(call)["arguments"]
    (plain,) = HermesParser().extract('<tool_call>{"name": "f", "arguments": {"y": "é"}}').calls
    assert plain.arguments == '{"y": "é"}'  # escaped only where it must be


def test_the_hermes_parser_holds_back_only_what_may_be_a_call() -> None:
    parser = HermesParser()
    assert parser.held_from("Hello") == 5
    assert parser.held_from("Hello <tool") == 6  # a marker may be starting
    assert parser.held_from("Hello <tools") == 12  # it was not one
    assert parser.held_from("a<tool_call>{} <") == 1  # from the first marker on
    assert parser.held_from(" \n<tool_call>{") == 0  # whitespace alone is no content
    assert parser.held_from(" \n<to") == 0
    llama = Llama3JsonParser()
    assert llama.held_from("  ") == 0
    assert llama.held_from(' {"na') == 0
    assert llama.held_from("<|pyth") == 0
    assert llama.held_from("The answer") == 10


def _streamed(calling: ToolCalling, text: str, cuts: list[int]) -> tuple[dict[str, Any], str]:
    """The message a client adds up from the deltas of `text` arriving in pieces ending at
    `cuts`, and the last finish reason."""
    stream = ToolCallStream(calling)
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for end in [*cuts, len(text)]:
        delta = stream.delta(text[:end], finished=end == len(text))
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            whole = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            if "id" in call:
                whole["id"] = call["id"]
                whole["name"] += call["function"]["name"]
            whole["arguments"] += call["function"].get("arguments", "")
    assert stream.parsed is not None
    finish = calling.finish_reason("stop", stream.parsed)
    message = {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}
    return message, str(finish)


TOOL_NAMES = frozenset({"get_weather", "get_time"})


def test_auto_calls_only_the_tools_given() -> None:
    # A model answering in JSON that has a "name" key (or a hallucinated function) called
    # nothing: the text is the content, whole.
    calling = ToolCalling("auto", parser=Llama3JsonParser(), names=TOOL_NAMES)
    answer = '{"name": "Ada", "parameters": {"age": 36}}'
    assert calling.parse(answer) == ParsedOutput(answer, ())
    assert calling.finish_reason("stop", calling.parse(answer)) == "stop"
    assert calling.parse('{"name": "get_time"}') == ParsedOutput(None, (TIME,))
    hermes = ToolCalling("auto", parser=HermesParser(), names=TOOL_NAMES)
    one_unknown = (
        'Hi<tool_call>{"name": "get_time"}</tool_call><tool_call>{"name": "rm"}</tool_call>'
    )
    assert hermes.parse(one_unknown) == ParsedOutput(one_unknown, ())


HERMES_OUTPUTS = [
    "No call here, only <b>text</b> and a < sign.",
    'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
    '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    'Broken <tool_call>{"name": "get_weather", "argu',
    '\n\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n',
    "  \n",
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> then text',
    'Sure.\n<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',
]
LLAMA_OUTPUTS = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "  Plain text, no call.",
    '{"not": "a call"}',
    '{"name": "Ada", "parameters": {"age": 36}}',
]


@pytest.mark.parametrize(
    ("parser", "text"),
    [(HermesParser(), t) for t in HERMES_OUTPUTS]
    + [(Llama3JsonParser(), t) for t in LLAMA_OUTPUTS],
)
def test_streamed_deltas_add_up_to_the_whole_message(parser: Any, text: str) -> None:
    calling = ToolCalling("auto", parser=parser, names=TOOL_NAMES)
    whole, parsed = calling.message(text)
    rng = random.Random(text)
    for trial in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, trial % 9 + 1)))
        message, finish = _streamed(calling, text, cuts)
        assert message["content"] == whole["content"]
        assert [(c["name"], c["arguments"]) for c in message["tool_calls"]] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])
        ]
        assert finish == ("tool_calls" if parsed.calls else "stop")
        # Content that may be a call is never sent before the model ends.
        if parsed.calls:
            assert "<tool_call>" not in (message["content"] or "")


def test_streamed_named_and_required_calls() -> None:
    named = ToolCalling("named", function="get_weather")
    arguments = '{"city": "Paris"}'
    message, finish = _streamed(named, arguments, [1, 5, 9])
    assert message["tool_calls"] == [
        {"id": message["tool_calls"][0]["id"], "name": "get_weather", "arguments": arguments}
    ]
    assert message["content"] is None and finish == "stop"  # OpenAI's, for a named function
    stream = ToolCallStream(named)
    # Nothing before the arguments start (a reasoning model may still be thinking); then the
    # name and id with the first of them, the rest after.
    assert stream.delta("", finished=False) == {}
    first = stream.delta("{", finished=False)
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{"}
    assert stream.delta('{"', finished=False) == {
        "tool_calls": [{"index": 0, "function": {"arguments": '"'}}]
    }
    assert stream.delta('{"', finished=False) == {}

    required = ToolCalling("required")
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}}])
    message, finish = _streamed(required, text, [3, 10])
    assert [(c["name"], c["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert message["content"] is None and finish == "tool_calls"
    cut_short = text[:-5]  # max_tokens ended it: no call, its text is the content
    stream = ToolCallStream(required)
    assert stream.delta(cut_short, finished=True) == {"content": cut_short}
    assert stream.parsed is not None
    assert required.finish_reason("length", stream.parsed) == "length"
    for not_calls in ["[]", text + " and more", '{"name": "get_time", "parameters": {}}']:
        assert required.parse(not_calls) == ParsedOutput(not_calls, ())
    message, _ = required.message(text)  # a message's calls have no index (a stream's have)
    assert [set(call) for call in message["tool_calls"]] == [{"id", "type", "function"}]
    one = ToolCalling("required", parallel=False)
    two = json.dumps([{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}])
    assert one.parse(two).calls == (FunctionCall("a", "{}"),)


def test_a_parser_whose_marker_the_tokenizer_drops_is_refused(tmp_path: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    from medha.model.tokenizer import Tokenizer, write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert isinstance(tool_call_parser("hermes", Tokenizer(hf, folder=tmp_path)), HermesParser)
    hf.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    with pytest.raises(ValueError, match="marks special"):
        tool_call_parser("hermes", Tokenizer(hf, folder=tmp_path))
    assert isinstance(
        tool_call_parser("llama3_json", Tokenizer(hf, folder=tmp_path)), Llama3JsonParser
    )
    with pytest.raises(ValueError, match="no tool-call parser 'mistral'"):
        tool_call_parser("mistral", Tokenizer(hf, folder=tmp_path))


def test_the_serve_commands_parser_names_are_the_parsers() -> None:
    from medha.commands.serve import PARSER_NAMES
    from medha.server.tool_parsers import PARSERS

    assert sorted(PARSER_NAMES) == sorted(PARSERS)
