"""What an aborted request's last event carries: the text its OutputText held back; what a
token that ends a request without its own text (eos, a stop token) shows."""

from __future__ import annotations

import pytest

from medha.actors.tracked import TrackedRequest
from medha.output_text import OutputText
from medha.request import RequestMetrics, TokenEvent
from medha.sampling import SamplingParams
from tests.detokenizer_support import BYTE_LEVEL, HFDecoder, byte_token


class CharDecoder:
    """Token id i decodes to the i-th letter: every token is one whole character."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_an_abort_releases_what_a_possible_stop_string_held_back() -> None:
    output = OutputText(CharDecoder(), [], SamplingParams(max_tokens=10, stop=["cde"]))
    streamed = "".join(output.push(token).text for token in (0, 1, 2, 3))  # "abcd"
    assert streamed == "ab"  # "cd" could still become "cde"
    assert streamed + output.release_held() == "abcd"


def test_an_abort_with_nothing_held_releases_nothing() -> None:
    output = OutputText(CharDecoder(), [], SamplingParams(max_tokens=10, stop=["xyz"]))
    assert output.push(0).text == "a"
    assert output.release_held() == ""


def test_the_abort_event_of_a_request_carries_its_held_back_text() -> None:
    params = SamplingParams(max_tokens=10, stop=["cde"])
    request = TrackedRequest(
        request_id="r",
        prompt_ids=[0],
        params=params,
        max_new_tokens=10,
        output=OutputText(CharDecoder(), [0], params),
        metrics=RequestMetrics(arrival=0.0, deadline=1.0),
        deadline=None,
    )
    for token in (0, 1, 2, 3):
        request.emit(TokenEvent("r", token, request.output.push(token).text))
    request.abort(now=2.5)
    with request.receive:
        events = [request.receive.receive_nowait() for _ in range(5)]
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["a", "b", "", "", "cd"]
    assert request.text == "abcd" and request.finish_reason == "abort"
    assert request.metrics.finished_time == 2.5


def _pushed(stop_ids: list[int], ids: list[int], eos: tuple[int, ...] = ()) -> tuple[str, str]:
    params = SamplingParams(max_tokens=20, stop_token_ids=stop_ids)
    output = OutputText(HFDecoder(BYTE_LEVEL), [], params, eos_token_ids=eos)
    updates = [output.push(token) for token in ids]
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    return "".join(u.text for u in updates), str(updates[-1].finish_reason)


def test_a_stop_tokens_own_bytes_are_never_shown() -> None:
    # Its text is an unfinished character's first byte: stepping it through the detokenizer
    # and flushing at the end leaked it as U+FFFD.
    hi, stop = BYTE_LEVEL.encode("Hi").ids, byte_token(0xF0)
    assert _pushed([stop], [*hi, stop]) == ("Hi", "stop")


@pytest.mark.parametrize("ender", ["stop token", "eos"])
def test_bytes_held_before_an_ending_token_are_released_with_it(ender: str) -> None:
    # Half an emoji, then a token that ends the request without its own text: the half goes
    # out as the decode of everything before that token has it.
    before = [*BYTE_LEVEL.encode("Hi ").ids, byte_token(0xF0), byte_token(0x9F)]
    dot = BYTE_LEVEL.encode(".").ids[0]
    stop_ids, eos = ([dot], ()) if ender == "stop token" else ([], (dot,))
    assert _pushed(stop_ids, [*before, dot], eos) == (BYTE_LEVEL.decode(before), "stop")


@pytest.mark.parametrize("end", ["goes on", "length", "eos"])
def test_a_stop_string_may_end_in_the_bytes_released_at_the_end(end: str) -> None:
    # "Hi ", then half an emoji: U+FFFD once the request ends or the next token breaks it. A
    # stop string ending in it ended a request that went on (its text cut before it), but was
    # missed, and shown, where the request ended right there (by length or eos): the text
    # depended on where the request ended.
    ids = [*BYTE_LEVEL.encode("Hi ").ids, byte_token(0xF0), byte_token(0x9F)]
    dot = BYTE_LEVEL.encode(".").ids[0]
    max_tokens = len(ids) if end == "length" else 20
    params = SamplingParams(max_tokens=max_tokens, stop=[" \ufffd"])
    eos = (dot,) if end == "eos" else ()
    output = OutputText(HFDecoder(BYTE_LEVEL), [], params, eos_token_ids=eos)
    text, reason = "", None
    for token in [*ids, dot, dot]:
        update = output.push(token)
        text += update.text
        if update.finished:
            reason = update.finish_reason
            break
    assert (text, reason) == ("Hi", "stop")


def test_a_request_hands_out_any_span_of_its_prompt_and_output() -> None:
    params = SamplingParams(max_tokens=10)
    prompt = [0, 1, 2, 3]
    request = TrackedRequest(
        request_id="r",
        prompt_ids=list(prompt),
        params=params,
        max_new_tokens=10,
        output=OutputText(CharDecoder(), prompt, params),
        metrics=RequestMetrics(arrival=0.0, deadline=1.0),
        deadline=None,
    )
    for token in (4, 5, 6):
        request.emit(TokenEvent("r", token, request.output.push(token).text))
    everything = (0, 1, 2, 3, 4, 5, 6)
    for start in range(len(everything)):
        for end in range(start + 1, len(everything) + 1):
            assert request.tokens(start, end) == everything[start:end]


_SPECIAL = BYTE_LEVEL.token_to_id("<eos>")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_have_text_only_without_skip_special_tokens(skip: bool) -> None:
    hi = BYTE_LEVEL.encode("Hi").ids
    ids = [*hi, _SPECIAL, *hi]
    params = SamplingParams(max_tokens=len(ids), skip_special_tokens=skip)
    output = OutputText(HFDecoder(BYTE_LEVEL), [_SPECIAL], params)
    assert "".join(output.push(token).text for token in ids) == ("HiHi" if skip else "Hi<eos>Hi")


@pytest.mark.parametrize(
    ("skip", "include", "shown"),
    [(True, True, ""), (False, True, "<eos>"), (False, False, ""), (True, False, "")],
)
def test_an_eos_shows_its_text_with_include_stop_str_in_output(
    skip: bool, include: bool, shown: str
) -> None:
    params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=include)
    output = OutputText(HFDecoder(BYTE_LEVEL), [], params, eos_token_ids=(_SPECIAL,))
    updates = [output.push(token) for token in [*BYTE_LEVEL.encode("Hi").ids, _SPECIAL]]
    assert "".join(u.text for u in updates) == "Hi" + shown
    assert updates[-1].finish_reason == "stop"
