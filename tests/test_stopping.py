"""StopChecker: eos, stop token ids, stop strings across token boundaries, and max_tokens,
with the text vLLM would return."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.sampling import SamplingParams
from medha.stopping import StopChecker, StopUpdate

EOS = 2
PLAIN = 10  # an ordinary token id: what the token is does not matter for stop strings


def _run(
    checker: StopChecker, deltas: Sequence[str], token_ids: Sequence[int] | None = None
) -> list[StopUpdate]:
    """Feed deltas until the request finishes; the updates produced."""
    updates = []
    for token_id, delta in zip(token_ids or [PLAIN] * len(deltas), deltas, strict=True):
        updates.append(checker.update(token_id, delta))
        if updates[-1].finished:
            break
    return updates


def _emitted(updates: Sequence[StopUpdate]) -> str:
    return "".join(update.text for update in updates)


def test_without_stop_conditions_text_streams_until_max_tokens() -> None:
    checker = StopChecker(SamplingParams(max_tokens=3), eos_token_ids=(EOS,))
    updates = _run(checker, ["a", "b", "c"])
    assert [u.text for u in updates] == ["a", "b", "c"]
    assert [u.finish_reason for u in updates] == [None, None, "length"]
    assert updates[-1].matched is None


def test_max_tokens_argument_overrides_the_params() -> None:
    checker = StopChecker(SamplingParams(max_tokens=10), (EOS,), max_tokens=2)
    assert [u.finish_reason for u in _run(checker, ["a", "b"])] == [None, "length"]


def test_eos_stops_and_its_text_is_not_emitted() -> None:
    checker = StopChecker(SamplingParams(), eos_token_ids=(EOS, 7))
    updates = _run(checker, ["hi", "</s>"], token_ids=[PLAIN, 7])
    assert updates[-1] == StopUpdate(text="", finish_reason="stop", matched=7)
    assert _emitted(updates) == "hi"


def test_eos_text_is_kept_with_include_stop_str_in_output() -> None:
    # vLLM's rule: the token that ended the request is detokenized with the flag (an eos that
    # is a special token then has text only without skip_special_tokens).
    params = SamplingParams(include_stop_str_in_output=True)
    checker = StopChecker(params, eos_token_ids=(EOS, 7))
    assert checker.hides(7) is False
    updates = _run(checker, ["hi", "</s>"], token_ids=[PLAIN, 7])
    assert updates[-1] == StopUpdate(text="</s>", finish_reason="stop", matched=7)
    assert _emitted(updates) == "hi</s>"
    assert StopChecker(SamplingParams(), eos_token_ids=(7,)).hides(7) is True


def test_eos_on_the_last_allowed_token_is_a_stop_not_a_length_finish() -> None:
    checker = StopChecker(SamplingParams(max_tokens=2), eos_token_ids=(EOS,))
    updates = _run(checker, ["a", ""], token_ids=[PLAIN, EOS])
    assert updates[-1].finish_reason == "stop"
    assert updates[-1].matched == EOS


def test_ignore_eos_treats_eos_as_an_ordinary_token() -> None:
    checker = StopChecker(SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=(EOS,))
    updates = _run(checker, ["a", "<eos>", "b"], token_ids=[PLAIN, EOS, PLAIN])
    assert [u.finish_reason for u in updates] == [None, None, "length"]
    assert _emitted(updates) == "a<eos>b"


def test_stop_token_ids_stop_even_with_ignore_eos_and_drop_their_text() -> None:
    params = SamplingParams(ignore_eos=True, stop_token_ids=[EOS, 9])
    updates = _run(StopChecker(params, (EOS,)), ["a", "<|im_end|>"], token_ids=[PLAIN, 9])
    assert updates[-1] == StopUpdate(text="", finish_reason="stop", matched=9)
    assert _emitted(updates) == "a"


def test_stop_token_text_is_kept_with_include_stop_str_in_output() -> None:
    params = SamplingParams(stop_token_ids=[9], include_stop_str_in_output=True)
    updates = _run(StopChecker(params, (EOS,)), ["a", "<|im_end|>"], token_ids=[PLAIN, 9])
    assert _emitted(updates) == "a<|im_end|>"
    assert updates[-1].matched == 9


def test_stop_string_inside_one_delta_cuts_the_text_before_it() -> None:
    updates = _run(StopChecker(SamplingParams(stop="###"), ()), ["Hello###world"])
    assert updates == [StopUpdate(text="Hello", finish_reason="stop", matched="###")]


def test_stop_string_spanning_tokens_is_held_back_then_dropped() -> None:
    checker = StopChecker(SamplingParams(stop=["###"]), ())
    updates = _run(checker, ["Hel", "lo #", "#", "# more"])
    assert [u.text for u in updates] == ["Hel", "lo ", "", ""]
    assert updates[-1].finish_reason == "stop"
    assert updates[-1].matched == "###"


def test_held_text_is_released_once_it_can_no_longer_match() -> None:
    checker = StopChecker(SamplingParams(stop=["###"]), ())
    first = checker.update(PLAIN, "a#")
    assert (first.text, checker.held_text) == ("a", "#")
    second = checker.update(PLAIN, "#b")
    assert (second.text, second.finish_reason, checker.held_text) == ("##b", None, "")


def test_held_text_is_flushed_when_max_tokens_ends_the_request() -> None:
    checker = StopChecker(SamplingParams(stop=["###"], max_tokens=2), ())
    updates = _run(checker, ["a", "##"])
    assert updates[-1] == StopUpdate(text="##", finish_reason="length", matched=None)


def test_held_text_is_flushed_when_eos_ends_the_request() -> None:
    checker = StopChecker(SamplingParams(stop=["###"]), (EOS,))
    updates = _run(checker, ["a#", ""], token_ids=[PLAIN, EOS])
    assert updates[-1] == StopUpdate(text="#", finish_reason="stop", matched=EOS)


def test_include_stop_str_in_output_keeps_the_stop_string_and_nothing_after() -> None:
    params = SamplingParams(stop="END", include_stop_str_in_output=True)
    updates = _run(StopChecker(params, ()), ["done E", "ND and more"])
    assert _emitted(updates) == "done END"
    assert updates[-1].matched == "END"


def test_stop_string_beats_max_tokens_on_the_same_token() -> None:
    checker = StopChecker(SamplingParams(stop="x", max_tokens=1), ())
    assert checker.update(PLAIN, "abxcd") == StopUpdate("ab", "stop", "x")


def test_the_stop_string_completed_first_wins() -> None:
    # Streaming char by char, "bc" is complete before "abcd" is.
    updates = _run(StopChecker(SamplingParams(stop=["abcd", "bc"]), ()), ["a", "bcd"])
    assert (_emitted(updates), updates[-1].matched) == ("a", "bc")


def test_among_stop_strings_completed_together_the_first_in_the_list_wins() -> None:
    # As vLLM: stop-list order, not length (the longest had won, cutting at "x").
    updates = _run(StopChecker(SamplingParams(stop=["c", "abc"]), ()), ["xab", "c"])
    assert (_emitted(updates), updates[-1].matched) == ("xab", "c")
    updates = _run(StopChecker(SamplingParams(stop=["abc", "c"]), ()), ["xab", "c"])
    assert (_emitted(updates), updates[-1].matched) == ("x", "abc")


def test_a_held_prefix_of_one_stop_string_can_complete_another() -> None:
    updates = _run(StopChecker(SamplingParams(stop=["abx", "bc"]), ()), ["a", "b", "c"])
    assert [u.text for u in updates] == ["", "", "a"]
    assert updates[-1].matched == "bc"


def test_the_first_min_tokens_tokens_never_end_the_request() -> None:
    params = SamplingParams(min_tokens=3, max_tokens=6, stop=["x"], stop_token_ids=[7])
    checker = StopChecker(params, eos_token_ids=(EOS,))
    # eos, a stop token (which the sampler never picks before min_tokens; their text is not
    # shown) and a stop string in the first three tokens end nothing; token 4's stop string does.
    updates = _run(checker, ["x", "", "", "bxc"], token_ids=[PLAIN, EOS, 7, PLAIN])
    assert [u.finish_reason for u in updates] == [None, None, None, "stop"]
    assert _emitted(updates) == "xb"
    assert updates[-1].matched == "x"


def test_a_stop_string_begun_before_min_tokens_ends_the_request_when_it_completes() -> None:
    checker = StopChecker(SamplingParams(min_tokens=2, stop=["END"]))
    updates = _run(checker, ["ok", " E", "ND!"])
    assert [u.finish_reason for u in updates] == [None, None, "stop"]
    assert _emitted(updates) == "ok "


def test_a_stop_string_completed_before_min_tokens_never_ends_the_request_later() -> None:
    # "ab" completes on token 2, held back as the start of "abcd"; neither token 3 nor 4 may
    # end the request with it (vLLM's stop_check_offset).
    checker = StopChecker(SamplingParams(min_tokens=2, max_tokens=5, stop=["ab", "abcd"]))
    updates = _run(checker, ["a", "b", "c", "x", "ab"])
    assert [u.finish_reason for u in updates] == [None, None, None, None, "stop"]
    assert _emitted(updates) == "abcx"
    checker = StopChecker(SamplingParams(min_tokens=2, max_tokens=4, stop=["ab", "abcd"]))
    updates = _run(checker, ["a", "b", "c", "d"])
    assert updates[-1].matched == "abcd"  # ends in token 4's text, begun before


def test_a_stop_token_right_after_min_tokens_ends_the_request() -> None:
    checker = StopChecker(SamplingParams(min_tokens=2, stop_token_ids=[7]), eos_token_ids=(EOS,))
    updates = _run(checker, ["a", "", "b", ""], token_ids=[7, EOS, PLAIN, EOS])
    assert [u.finish_reason for u in updates] == [None, None, None, "stop"]
    assert updates[-1].matched == EOS


def test_update_after_the_request_finished_is_an_error() -> None:
    checker = StopChecker(SamplingParams(max_tokens=1), ())
    checker.update(PLAIN, "a")
    with pytest.raises(RuntimeError, match="finished"):
        checker.update(PLAIN, "b")


def test_non_positive_max_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(SamplingParams(), (), max_tokens=0)


def _truncate_at_first_stop(
    text: str, stops: Sequence[str], include: bool, after: int = 0
) -> tuple[str, str | None]:
    """What vLLM returns for the whole text: cut at the stop string that completes first, past
    the first `after` characters (the text of the first min_tokens tokens), the first in the
    list of those that complete there."""
    for end in range(after + 1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            stop = completed[0]
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


small_text = st.text(alphabet="ab#\u00e9", max_size=30)


@st.composite
def text_split_into_deltas(draw: st.DrawFn) -> list[str]:
    text = draw(small_text)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(
    deltas=text_split_into_deltas(),
    stops=st.lists(st.text(alphabet="ab#\u00e9", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    min_tokens=st.integers(0, 4),
)
def test_emitted_text_is_the_full_text_cut_at_the_first_stop_string(
    deltas: list[str], stops: list[str], include: bool, min_tokens: int
) -> None:
    min_tokens = min(min_tokens, len(deltas))
    params = SamplingParams(
        stop=stops, include_stop_str_in_output=include, min_tokens=min_tokens, max_tokens=None
    )
    checker = StopChecker(params, (), max_tokens=len(deltas))
    updates = _run(checker, deltas)
    expected_text, expected_stop = _truncate_at_first_stop(
        "".join(deltas), stops, include, after=len("".join(deltas[:min_tokens]))
    )
    assert _emitted(updates) == expected_text
    last = updates[-1]
    assert last.finished
    if expected_stop is None:
        assert (last.finish_reason, last.matched) == ("length", None)
    else:
        assert (last.finish_reason, last.matched) == ("stop", expected_stop)
    # Nothing is emitted that a later stop string could still take back.
    for count in range(1, len(updates)):
        streamed = _emitted(updates[:count])
        assert expected_text.startswith(streamed)


def test_a_token_that_completes_the_structured_output_ends_the_request() -> None:
    checker = StopChecker(SamplingParams(max_tokens=8, min_tokens=5, stop=["}}"]), (EOS,))
    assert checker.update(PLAIN, '{"a":1') == StopUpdate('{"a":1')
    # "}" may start the stop string, so it would be held back: completing flushes it. And
    # min_tokens cannot hold the request open: the grammar allows nothing more.
    assert checker.update(PLAIN, "}", complete=True) == StopUpdate("}", "stop", None)


def test_a_stop_string_in_the_completing_token_still_cuts_the_text() -> None:
    checker = StopChecker(SamplingParams(stop=["b"]), ())
    assert checker.update(PLAIN, "abc", complete=True) == StopUpdate("a", "stop", "b")
