"""Prompt logprobs, below the engine: the sliced LM-head scoring (medha.model.prompt_scoring) and
which rows of a step the engine's record of a request asks to score (TrackedRequest.score_rows),
so that chunking and preemption score every prompt token once."""

from __future__ import annotations

import threading

import pytest
import torch

import medha.model.prompt_scoring as prompt_scoring
from medha.actors.messages import ModelStep, ResumeStep, SeqWork, StepOutput, StepPaused
from medha.actors.model_thread import ModelThread
from medha.actors.prompt_scores import score_prompts
from medha.actors.stage import StageActor
from medha.actors.tracked import TrackedRequest
from medha.errors import InvalidSamplingParamsError
from medha.model.prompt_scoring import PromptScores, ScoreSpan, score_spans
from medha.model.setup import build_runner
from medha.model.single import generate_single
from medha.request import TokenLogprob
from medha.sampling import SamplingParams, SamplingSetup
from tests.engine_support import tracked_request
from tests.test_output_text import CharDecoder

VOCAB = 50


def _head() -> tuple[torch.nn.Module, list[int]]:
    """A random LM head that counts the rows of each call."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, VOCAB)
    calls: list[int] = []

    def head(rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows.shape[0])
        return linear(rows).float()

    return head, calls  # type: ignore[return-value]


def test_sliced_scores_equal_the_whole_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt_scoring, "SLICE_ROWS", 7)
    head, calls = _head()
    hidden = torch.randn(30, 8)
    spans = [ScoreSpan(range(2, 12), first=5, top=3), ScoreSpan(range(15, 29), first=1, top=0)]
    targets = [list(range(10)), list(range(20, 34))]
    scores = score_spans(hidden, spans, head, targets)
    # 24 rows in slices of at most 7: the logits never exist for all rows at once.
    assert calls == [7, 7, 7, 3]
    whole = head(hidden).log_softmax(-1)
    assert scores is not None
    for span, span_targets, score in zip(spans, targets, scores, strict=True):
        rows = list(span.rows)
        expected = whole[rows, span_targets]
        assert score.first == span.first
        torch.testing.assert_close(torch.tensor(score.logprobs), expected)
        top = whole[rows].topk(3, dim=-1) if span.top else None
        for i, row_top in enumerate(score.top_logprobs):
            if top is None:
                assert row_top == ()
                continue
            assert [t.token_id for t in row_top] == top.indices[i].tolist()
            torch.testing.assert_close(torch.tensor([t.logprob for t in row_top]), top.values[i])


def test_a_tp_peer_runs_the_same_head_calls_and_gets_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each head call all-gathers the vocabulary across TP ranks: the peer must make the same
    # calls, on the same rows, as the rank that scores.
    monkeypatch.setattr(prompt_scoring, "SLICE_ROWS", 4)
    head, calls = _head()
    hidden = torch.randn(12, 8)
    spans = [ScoreSpan(range(0, 10), first=1, top=2)]
    assert score_spans(hidden, spans, head, [list(range(10))]) is not None
    scorer_calls = list(calls)
    calls.clear()
    assert score_spans(hidden, [ScoreSpan(range(0, 10), 1, 0)], head, None) is None
    assert calls == scorer_calls == [4, 4, 2]


def test_targets_must_match_the_rows() -> None:
    head, _ = _head()
    with pytest.raises(ValueError, match="3 rows to score but 2 targets"):
        score_spans(torch.randn(4, 8), [ScoreSpan(range(3), 1, 0)], head, [[1, 2]])


def _request(prompt_len: int, prompt_logprobs: int | None = 2) -> TrackedRequest:
    params = SamplingParams(max_tokens=50, prompt_logprobs=prompt_logprobs)
    return tracked_request(list(range(prompt_len)), params)


def _scores(request: TrackedRequest, start: int, rows: range) -> PromptScores:
    """What a stage would report for `rows` of a step from position `start`: token i's
    logprob is -i."""
    first = start + rows.start + 1
    tokens = range(first, first + len(rows))
    return PromptScores(
        first, tuple(-float(t) for t in tokens), tuple((TokenLogprob(t, -0.5),) for t in tokens)
    )


def test_chunks_score_each_prompt_token_once_and_the_last_row_samples() -> None:
    request = _request(10)
    assert request.prompt_logprobs == [None]
    # Chunks [0, 4), [4, 10): the row of position p scores token p + 1; position 9 (the last)
    # samples the first output token instead.
    assert request.score_rows(0, 4) == range(0, 4)
    request.add_prompt_scores(_scores(request, 0, range(0, 4)))
    assert request.score_rows(4, 10) == range(0, 5)
    request.add_prompt_scores(_scores(request, 4, range(0, 5)))
    assert request.prompt_logprobs == [None, *(-float(t) for t in range(1, 10))]
    assert request.prompt_top_logprobs[0] is None
    assert request.prompt_top_logprobs[9] == (TokenLogprob(9, -0.5),)
    # A recompute after a preemption (prompt and one output token) scores nothing again.
    assert request.score_rows(0, 11) == range(0, 0)


def test_a_recompute_in_the_middle_of_the_prompt_scores_only_what_is_missing() -> None:
    request = _request(40)
    request.add_prompt_scores(_scores(request, 0, request.score_rows(0, 16)))
    # Preempted after 16 positions: the recompute runs [0, 24), of which rows 16..23 are new.
    assert request.score_rows(0, 24) == range(16, 24)
    # A late duplicate (a stage reporting rows it had already reported) changes nothing.
    request.add_prompt_scores(_scores(request, 0, range(10, 24)))
    assert request.prompt_logprobs == [None, *(-float(t) for t in range(1, 25))]
    # A gap is a bug, not something to paper over.
    with pytest.raises(RuntimeError, match="from token 30, but only the first 25"):
        request.add_prompt_scores(_scores(request, 29, range(0, 2)))


def test_requests_without_prompt_logprobs_score_nothing() -> None:
    request = _request(10, prompt_logprobs=None)
    assert request.score_rows(0, 10) == range(0)
    assert request.prompt_logprobs == []
    assert request.prompt_logprobs_once() == (None, None)


def test_a_one_token_prompt_has_nothing_to_score() -> None:
    request = _request(1)
    assert request.score_rows(0, 1) == range(0)
    assert request.prompt_logprobs == [None]


def test_generate_single_refuses_prompt_logprobs_rather_than_drop_them() -> None:
    with pytest.raises(InvalidSamplingParamsError, match=r"run the request on a medha\.Engine"):
        next(
            generate_single(
                None,  # type: ignore[arg-type]
                [1, 2, 3],
                SamplingParams(prompt_logprobs=1),
                CharDecoder(),
            )
        )


def _stage_scores(pause: bool) -> tuple[object, dict[str, object]]:
    """A step of a decode and a scoring prefill chunk on the single-process stage, paused after
    its first layer (its decode split off and finished at once) and resumed, or run through:
    the chunk's prompt logprobs, and the decode's token."""
    runner, _ = build_runner("tiny-random", num_blocks=64)
    stage = StageActor(runner, ModelThread("test-model"))
    chat = [5 + i for i in range(20)]
    first = stage.run_step(
        ModelStep(0, (SeqWork("d", 0, tuple(chat), (0, 1), True, SamplingSetup(_GREEDY, 20)),))
    )
    assert isinstance(first, StepOutput)
    token = first.sampled["d"].token_id
    prompt = tuple(100 + 3 * i for i in range(40))
    scoring = SamplingSetup(SamplingParams.greedy(5, prompt_logprobs=3), 40, (), prompt)
    works = (
        SeqWork("d", 20, (token,), (), True, None, decode=True),
        SeqWork("s", 0, prompt[:32], (2, 3), False, scoring, score_rows=range(0, 32)),
    )
    event = threading.Event()
    if pause:
        event.set()
    result = stage.run_step(ModelStep(1, works, pause=event))
    decoded = {}
    if pause:
        assert isinstance(result, StepPaused) and result.layers_done == 1
        decoded = dict(result.sampled)
        result = stage.resume_step(ResumeStep(1))
    assert isinstance(result, StepOutput)
    decoded.update(result.sampled)
    return result.prompt_scores["s"], decoded


_GREEDY = SamplingParams.greedy(5)


def test_a_paused_step_scores_its_prompt_rows_as_one_that_ran_through() -> None:
    through, decoded_through = _stage_scores(pause=False)
    paused, decoded_paused = _stage_scores(pause=True)
    # The prefill part of a paused step resumes bitwise (medha.model.layerwise): same scores.
    assert paused == through
    assert isinstance(through, PromptScores) and through.first == 1
    assert len(through.logprobs) == 32 and all(len(top) == 3 for top in through.top_logprobs)
    assert decoded_paused.keys() == decoded_through.keys() == {"d"}


def test_a_scorer_that_fails_first_makes_its_tp_peers_head_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its TP peers are in the head's all-gathers: failing before them would leave the peers
    # waiting out the collective timeout instead of failing on the next step.
    monkeypatch.setattr(prompt_scoring, "SLICE_ROWS", 4)
    head, calls = _head()
    works = [SeqWork("r", 0, tuple(range(10)), (), False, score_rows=range(0, 9))]

    def unknown(request_id: str) -> object:
        raise KeyError(request_id)

    with pytest.raises(KeyError):
        score_prompts(torch.randn(10, 8), works, head, unknown)  # type: ignore[arg-type]
    assert calls == [4, 4, 1]
    calls.clear()
    assert score_prompts(torch.randn(10, 8), works, head, None) == {}
    assert calls == [4, 4, 1]
