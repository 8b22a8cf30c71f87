"""What an aborted request's last event carries: the text its OutputText held back."""

from __future__ import annotations

from medha.actors.tracked import TrackedRequest
from medha.output_text import OutputText
from medha.request import RequestMetrics, TokenEvent
from medha.sampling import SamplingParams


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
