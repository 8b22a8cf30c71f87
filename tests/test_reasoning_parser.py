"""Reasoning parsers (medha.server.reasoning): a chat output's thinking and answer, where the
prompt says the output starts, the same whole or read in any pieces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from medha import SamplingParams, Thinking
from medha.model.tokenizer import Tokenizer, write_tiny_tokenizer
from medha.server.reasoning import (
    REASONING_PARSERS,
    OutputPart,
    Reasoning,
    ReasoningParser,
    reasoning_parser,
    thinking_first,
)

QWEN_THINKING_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
OPENED = "<|im_start|>assistant\n<think>\n"

CASES = [
    # parser, prompt's end, output -> (reasoning, content)
    ("qwen3", "", "<think>\nplan\n</think>\n\nAnswer", ("\nplan\n", "\n\nAnswer")),
    ("qwen3", "", "Answer", (None, "Answer")),
    ("qwen3", "", "", (None, "")),
    ("qwen3", "", "  <think>x</think>y", ("x", "y")),
    ("qwen3", "", "<thinking>x</thinking>", (None, "<thinking>x</thinking>")),
    ("qwen3", "", "<think>cut short", ("cut short", None)),
    ("qwen3", "", "<think>a</think>b<think>c</think>", ("a", "b<think>c</think>")),
    ("qwen3", QWEN_THINKING_OFF, "Answer </think>", (None, "Answer </think>")),
    ("qwen3", OPENED, "plan</think>Answer", ("plan", "Answer")),
    ("qwen3", OPENED, "plan </th", ("plan </th", None)),  # never closed
    ("qwen3", "", " <thi", (None, " <thi")),
    ("qwen3", OPENED, " <think>plan</think>", ("plan", None)),  # opened twice
    ("deepseek_r1", "", "plan</think>Answer", ("plan", "Answer")),
    ("deepseek_r1", "", "<think>plan</think>Answer", ("plan", "Answer")),
    ("deepseek_r1", "", "plan cut short", ("plan cut short", None)),
    ("deepseek_r1", QWEN_THINKING_OFF, "Answer", (None, "Answer")),
    ("deepseek_r1", OPENED, "\n\nplan</think>\n\nAnswer", ("\n\nplan", "\n\nAnswer")),
]


@pytest.mark.parametrize(("name", "prompt", "output", "expected"), CASES)
def test_the_thinking_and_the_answer_whole_or_read_in_any_pieces(
    name: str,
    prompt: str,
    output: str,
    expected: tuple[str | None, str | None],
) -> None:
    reasoning = Reasoning.of(REASONING_PARSERS[name], prompt, True)
    whole = reasoning.split()
    whole.feed(output, finished=True)
    assert whole.message_parts() == expected
    rng = random.Random(output)
    for _ in range(30):
        inner = range(1, max(len(output), 1))
        cuts = sorted(rng.sample(inner, min(len(inner), rng.randint(0, 6))))
        ends = [*cuts, len(output)] if output else [0]
        split = reasoning.split()
        thought, answered = "", ""
        for end in ends:
            new_thought, new_answer = split.feed(output[:end], finished=end == ends[-1])
            thought, answered = thought + new_thought, answered + new_answer
        assert split.message_parts() == expected
        assert (thought, answered) == (expected[0] or "", expected[1] or "")


def test_a_tag_split_across_pieces_is_held_back_until_it_is_whole() -> None:
    split = Reasoning.of(REASONING_PARSERS["qwen3"], OPENED, True).split()
    assert split.feed("plan</th", finished=False) == ("plan", "")
    assert split.feed("plan</think>An", finished=False) == ("", "An")
    undecided = Reasoning.of(REASONING_PARSERS["qwen3"], "", True).split()
    assert undecided.feed(" <thi", finished=False) == ("", "")  # may still open thinking
    assert undecided.feed(" <thin!", finished=False) == ("", " <thin!")  # it did not


@pytest.mark.parametrize(
    ("name", "prompt", "thinking"),
    [
        ("qwen3", "", Thinking(opened=False)),  # it may think first
        ("qwen3", OPENED, Thinking(opened=True)),
        ("qwen3", QWEN_THINKING_OFF, None),
        ("deepseek_r1", "", Thinking(opened=True)),  # untagged, it thinks
        ("deepseek_r1", QWEN_THINKING_OFF, None),
    ],
)
def test_a_constrained_output_may_think_where_the_prompt_lets_it(
    name: str, prompt: str, thinking: Thinking | None
) -> None:
    parser = REASONING_PARSERS[name]
    assert parser.thinking(prompt) == thinking
    plain = SamplingParams(max_tokens=5)
    assert thinking_first(plain, thinking) is plain
    json_object = SamplingParams(structured_outputs={"json_object": True})
    constrained = thinking_first(json_object, thinking).structured_outputs
    assert constrained is not None and constrained.json_object
    assert constrained.thinking == thinking
    own = Thinking("[T]", "[/T]")  # a request's own is kept
    asked = SamplingParams(structured_outputs={"json_object": True, "thinking": own})
    assert thinking_first(asked, Thinking()) is asked
    never = SamplingParams(structured_outputs={"json_object": True, "thinking": False})
    assert thinking_first(never, Thinking()) is never


def test_a_prompt_that_ends_with_both_tags_opens_the_thinking() -> None:
    # Tags of a model's own, one the end of the other: the start tag wins, as for an output.
    parser = ReasoningParser(untagged_is_reasoning=False, start="<<t>", end="<t>")
    assert parser.untagged_output("prompt <<t>") is OutputPart.REASONING
    assert parser.thinking("prompt <<t>") == Thinking("<<t>", "<t>", opened=True)
    assert parser.thinking("prompt <t>") is None


def _tokenizer(folder: Path, *special: str) -> Tokenizer:
    """A tiny tokenizer, with `special` added as special tokens."""
    from transformers import PreTrainedTokenizerFast

    write_tiny_tokenizer(folder)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    hf.add_special_tokens({"additional_special_tokens": list(special)})
    return Tokenizer(hf, folder=folder)


def test_parsers_are_named_as_vllms(tmp_path: Path) -> None:
    from medha.commands.serve import REASONING_PARSER_NAMES

    assert sorted(REASONING_PARSER_NAMES) == sorted(REASONING_PARSERS)
    tokenizer = _tokenizer(tmp_path)
    assert reasoning_parser("qwen3", tokenizer) is REASONING_PARSERS["qwen3"]
    with pytest.raises(ValueError, match="no reasoning parser 'granite'"):
        reasoning_parser("granite", tokenizer)


@pytest.mark.parametrize("tag", ["<think>", "</think>"])
def test_a_tag_the_tokenizer_drops_as_special_is_refused(tmp_path: Path, tag: str) -> None:
    with pytest.raises(ValueError, match=f"looks for {tag} in the output text"):
        reasoning_parser("deepseek_r1", _tokenizer(tmp_path, tag))


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
def test_an_assistant_message_continued_mid_thought_goes_on_thinking(name: str) -> None:
    """continue_final_message with "<think>Let me think": the message's last tag opened the
    thinking, though text follows it (qwen3 had read the output as the answer, its
    "</think>" included); where its last tag closed it, the output is the answer."""
    parser = REASONING_PARSERS[name]
    tail = "<|im_start|>assistant\n<think>Let me think"
    continued = "<think>Let me think"
    assert parser.untagged_output(tail, continued) is OutputPart.REASONING
    assert parser.thinking(tail, continued) == Thinking(opened=True)
    split = Reasoning.of(parser, tail, True, None, continued).split()
    assert split.feed(" more.</think>The answer.", finished=True) == (" more.", "The answer.")
    answered = "<think>Done.</think>\n\nThe answer is"
    assert parser.untagged_output(f"assistant\n{answered}", answered) is OutputPart.CONTENT
    assert parser.thinking(f"assistant\n{answered}", answered) is None


def test_a_tag_in_a_users_message_says_nothing_of_the_output() -> None:
    """Only a tag that ends the prompt (the template's) or a continued assistant message
    tells where the output is: a user asking about "<think>" leaves qwen3's answer content."""
    tail = "What is the <think> tag for?<|im_end|>\n<|im_start|>assistant\n"
    parser = REASONING_PARSERS["qwen3"]
    assert parser.untagged_output(tail) is OutputPart.CONTENT
    assert parser.thinking(tail) == Thinking(opened=False)
    assert parser.untagged_output(tail, continued="") is OutputPart.CONTENT
