"""What medha.LLM takes besides the plain prompts of test_engine_api: vLLM's dict prompts, and
every prompt checked before any runs, a long text's too; and the engine's own checks of a
`sampling` that is not a SamplingParams."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import medha
from medha import InvalidRequestError, PromptTooLongError, SamplingParams
from tests.engine_support import engine_config

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> Any:
    with medha.LLM(engine_config()) as llm:
        yield llm


def test_vllms_dict_prompts_are_their_text_or_ids(llm: medha.LLM) -> None:
    ids = llm.engine.tokenize("Hello there")
    plain = llm.generate(["Hello there", ids], GREEDY)
    dicts = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}], GREEDY)
    (one,) = llm.generate({"prompt": "Hello there"}, GREEDY)
    assert [d.prompt_token_ids for d in dicts] == [p.prompt_token_ids for p in plain] == [ids] * 2
    assert [d.token_ids for d in dicts] == [p.token_ids for p in plain]
    assert one.token_ids == plain[0].token_ids
    for bad in (
        {"prompt": "Hi", "multi_modal_data": {}},
        {},
        {"prompt": "a", "prompt_token_ids": [1]},
    ):
        with pytest.raises(InvalidRequestError, match="dict prompt"):
            llm.generate(bad, GREEDY)


def test_a_dict_prompts_cache_salt_keeps_its_prefix_to_its_salt(llm: medha.LLM) -> None:
    document = [7 + i % 50 for i in range(100)]
    first, other, same = (
        llm.generate({"prompt_token_ids": document, "cache_salt": salt}, GREEDY)[0]
        for salt in ("tenant-a", "tenant-b", "tenant-a")
    )
    assert [d.metrics.cached_tokens for d in (first, other, same)] == [0, 0, 96]
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        llm.generate({"prompt": "Hi", "cache_salt": ""}, GREEDY)


def test_a_long_text_too_long_for_the_context_raises_before_anything_runs(
    llm: medha.LLM,
) -> None:
    too_long = "word " * 5000  # over 16,384 characters: tokenized off the event loop
    before = llm.engine.stats()
    with pytest.raises(PromptTooLongError):
        llm.generate([[7] * 300, too_long], GREEDY)
    after = llm.engine.stats()
    assert after.iterations == before.iterations and after.aborted == before.aborted
    assert after.free_blocks == after.total_blocks
    # A long text that fits runs as any other (one token a word here: ~2,800 tokens).
    fits = "there " * 2834
    (done,) = llm.generate(fits, SamplingParams(max_tokens=2, temperature=0.0))
    assert len(fits) > 16_384 and len(done.token_ids) == 2


def test_deadlines_may_be_a_numpy_array(llm: medha.LLM) -> None:
    done = llm.generate(["a", "b"], GREEDY, deadlines=np.array([20.0, 30.0]))
    assert [d.metrics.deadline for d in done] == [20.0, 30.0]


def test_arguments_of_the_wrong_type_are_typed_errors(llm: medha.LLM) -> None:
    with pytest.raises(InvalidRequestError, match="deadlines must be a list"):
        llm.generate(["a"], GREEDY, deadlines=2.0)  # type: ignore[arg-type]
    for sampling in ({"truncate_prompt_tokens": 2}, "greedy", 3):
        with pytest.raises(InvalidRequestError, match="sampling must be"):
            llm.engine.tokenize("hi", sampling)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="sampling must be"):
            llm.engine.output_limit(5, sampling)  # type: ignore[arg-type]


def test_vllms_keyword_names_are_taken(llm: medha.LLM, capsys: pytest.CaptureFixture[str]) -> None:
    """A vLLM script's `llm.generate(prompts, sampling_params=..., use_tqdm=...)`."""
    plain = llm.generate(["Hello", "there"], GREEDY)
    named = llm.generate(["Hello", "there"], sampling_params=GREEDY, use_tqdm=True)
    assert [d.token_ids for d in named] == [d.token_ids for d in plain]
    chat = [{"role": "user", "content": "Hi"}]
    assert (
        llm.chat(chat, sampling_params=GREEDY)[0].token_ids == llm.chat(chat, GREEDY)[0].token_ids
    )
    with pytest.raises(TypeError, match="not both"):
        llm.generate("Hello", GREEDY, sampling_params=GREEDY)


def test_use_tqdm_shows_the_finished_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    import rich.progress

    advanced: list[object] = []
    monkeypatch.setattr(
        rich.progress.Progress, "advance", lambda self, task, advance=1: advanced.append(task)
    )
    with medha.LLM(engine_config()) as llm:
        llm.generate(["a", "b", "c"], GREEDY, use_tqdm=True)
        assert len(advanced) == 3
        llm.generate(["a", "b"], GREEDY)
    assert len(advanced) == 3
