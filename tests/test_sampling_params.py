"""SamplingParams: vLLM's names and defaults, normalisation, and validation with clear errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from medha.errors import InvalidRequestError, InvalidSamplingParamsError
from medha.sampling import SamplingParams, bad_words_token_ids


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 1.0
    assert params.top_k == 0
    assert params.top_p == 1.0
    assert params.min_p == 0.0
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.ignore_eos is False
    assert params.logprobs is None
    assert params.include_stop_str_in_output is False
    assert params.skip_special_tokens is True
    assert params.min_tokens == 0
    assert params.repetition_penalty == 1.0
    assert params.presence_penalty == 0.0
    assert params.frequency_penalty == 0.0
    assert params.truncate_prompt_tokens is None
    assert params.bad_words == ()
    assert not params.needs_history
    assert not params.is_greedy


def test_params_are_frozen_and_hashable() -> None:
    params = SamplingParams(stop=["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 3  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams(stop=("a",)))


def test_greedy_constructor_sets_temperature_zero() -> None:
    params = SamplingParams.greedy(7)
    assert params.max_tokens == 7
    assert params.temperature == 0.0
    assert params.is_greedy


def test_greedy_constructor_accepts_other_fields() -> None:
    assert SamplingParams.greedy(3, stop="x").stop == ("x",)


def test_tiny_temperature_counts_as_greedy() -> None:
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy


@pytest.mark.parametrize(
    ("given", "stored"),
    [("###", ("###",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",)), (None, ())],
)
def test_stop_accepts_a_string_or_a_sequence_and_stores_a_tuple(
    given: object, stored: tuple[str, ...]
) -> None:
    assert SamplingParams(stop=given).stop == stored  # type: ignore[arg-type]


def test_stop_token_ids_list_is_stored_as_tuple() -> None:
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)  # type: ignore[arg-type]


def test_numpy_stop_token_ids_are_stored_as_python_ints() -> None:
    for ids in ([np.int64(13), 14], np.array([13, 14]), (np.uint32(13), np.int8(14))):
        params = SamplingParams(stop_token_ids=ids)  # type: ignore[arg-type]
        assert params.stop_token_ids == (13, 14)
        assert all(type(token) is int for token in params.stop_token_ids)


def test_integral_floats_are_accepted() -> None:
    params = SamplingParams(temperature=1, top_p=1, min_p=0)
    assert params.temperature == 1
    assert params.top_k == 0


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers() -> None:
    params = SamplingParams(
        max_tokens=np.int64(4),  # type: ignore[arg-type]
        temperature=np.float32(0.5),  # type: ignore[arg-type]
        top_k=np.int32(3),  # type: ignore[arg-type]
        top_p=np.float64(0.9),  # type: ignore[arg-type]
        min_p=np.float16(0.0),  # type: ignore[arg-type]
        seed=np.uint64(2**64 - 1),  # type: ignore[arg-type]
    )
    assert params == SamplingParams(
        max_tokens=4, temperature=0.5, top_k=3, top_p=0.9, min_p=0.0, seed=2**64 - 1
    )
    ints, floats = ("max_tokens", "top_k", "seed"), ("temperature", "top_p", "min_p")
    assert all(type(getattr(params, name)) is int for name in ints)
    assert all(type(getattr(params, name)) is float for name in floats)


def test_boundary_values_are_valid() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_k=-1, top_p=1.0, min_p=1.0, seed=0)
    SamplingParams(top_p=1e-9, min_p=0.0, seed=2**64 - 1, top_k=1)


def test_a_signed_seed_is_its_64_bits_unsigned_as_vllm_takes_int64_seeds() -> None:
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed"
    assert SamplingParams(seed=-(2**63)).seed == 2**63
    assert SamplingParams(seed=np.int64(-2)).seed == 2**64 - 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.0),
        ("max_tokens", True),
        ("max_tokens", np.bool_(True)),
        ("max_tokens", np.float32(2.0)),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("temperature", True),
        ("temperature", np.float32("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 3.0),
        ("top_k", False),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("seed", -(2**63) - 1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("stop", 5),
        ("stop", ["ok", 5]),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", {"a"}),
        ("stop_token_ids", 5),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", [np.bool_(True)]),
        ("stop_token_ids", [np.float32(2)]),
        ("stop_token_ids", np.array([[1, 2]])),
        ("stop_token_ids", np.array([1, -1])),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("logprobs", True),
        ("logprobs", np.bool_(True)),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 2.0),
        ("prompt_logprobs", True),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", "1"),
        ("include_stop_str_in_output", None),
        ("skip_special_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # above the default max_tokens of 16
        ("min_tokens", 1.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", True),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("presence_penalty", math.nan),
        ("frequency_penalty", 3),
        ("frequency_penalty", "0.5"),
        ("logit_bias", {"-5": -100}),
        ("logit_bias", {"five": 1.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1: math.nan}),
        ("logit_bias", [(1, 1.0), (1, 2.0)]),
        ("logit_bias", 5),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [3, -1]),
        ("allowed_token_ids", "3"),
        ("truncate_prompt_tokens", 0),
        ("truncate_prompt_tokens", -2),
        ("truncate_prompt_tokens", 2.5),
        ("truncate_prompt_tokens", True),
        ("bad_words", 5),
        ("bad_words", [""]),
        ("bad_words", ["ok", " \n"]),
        ("bad_words", ["ok", 3]),
    ],
)
def test_invalid_value_raises_error_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParamsError) as excinfo:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert f"SamplingParams.{field}=" in message
    assert repr(value) in message


def test_invalid_params_error_is_a_value_error_and_a_request_error() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=2.0)


def test_a_bool_logprobs_says_what_replaces_it() -> None:
    with pytest.raises(
        InvalidSamplingParamsError,
        match=r"0 reports each token.s log-probability only \(what logprobs=True did\)",
    ):
        SamplingParams(logprobs=True)  # type: ignore[arg-type]
    # The old default still means none.
    assert SamplingParams(logprobs=False).logprobs is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "needs_history"),
    [
        ({"logprobs": 5}, False),
        ({"repetition_penalty": 1.1}, True),
        ({"presence_penalty": -0.5}, True),
        ({"frequency_penalty": 2}, True),
        ({"min_tokens": 1}, True),
    ],
)
def test_penalties_and_min_tokens_need_the_token_history(
    overrides: dict[str, object], needs_history: bool
) -> None:
    assert SamplingParams(**overrides).needs_history is needs_history  # type: ignore[arg-type]


def test_penalties_take_numpy_numbers_and_store_floats() -> None:
    params = SamplingParams(
        max_tokens=np.int64(8),
        min_tokens=np.int32(8),
        repetition_penalty=np.float32(1.5),
        frequency_penalty=np.int64(-2),
        logprobs=np.int16(3),
    )
    assert (params.min_tokens, params.logprobs) == (8, 3)
    assert type(params.min_tokens) is int and type(params.logprobs) is int
    assert params.repetition_penalty == 1.5 and type(params.repetition_penalty) is float
    assert params.frequency_penalty == -2.0 and type(params.frequency_penalty) is float


def test_max_tokens_none_leaves_the_limit_to_the_context() -> None:
    params = SamplingParams(max_tokens=None, min_tokens=500)
    assert params.max_tokens is None and params.min_tokens == 500


def test_logit_bias_is_stored_by_token_id_and_clamped_like_openais() -> None:
    params = SamplingParams(logit_bias={np.int64(9): 1.5, 2: -500, 4: np.float32(200)})
    assert params.logit_bias == ((2, -100.0), (4, 100.0), (9, 1.5))
    assert hash(params) == hash(SamplingParams(logit_bias=[(9, 1.5), (4, 100), (2, -100)]))
    assert not params.needs_history


def test_token_ids_beyond_the_vocabulary_are_refused_by_name() -> None:
    SamplingParams(logit_bias={9: 1.0}, allowed_token_ids=[0, 9]).check_vocab(10)
    with pytest.raises(InvalidSamplingParamsError, match=r"logit_bias=\[10\]"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
    with pytest.raises(InvalidSamplingParamsError, match=r"allowed_token_ids=\[12\]"):
        SamplingParams(allowed_token_ids=np.array([3, 12])).check_vocab(10)


def test_logit_bias_takes_openais_string_ids_and_allowed_ids_are_kept_sorted_once() -> None:
    params = SamplingParams(logit_bias={"50256": -100, 7: 1}, allowed_token_ids=[9, 3, 9, 1])
    assert params.logit_bias == ((7, 1.0), (50256, -100.0))
    assert params.allowed_token_ids == (1, 3, 9)


def test_truncate_prompt_tokens_keeps_the_end_of_a_longer_prompt() -> None:
    params = SamplingParams(truncate_prompt_tokens=np.int64(3))
    assert params.truncate_prompt_tokens == 3 and type(params.truncate_prompt_tokens) is int
    assert params.truncated([1, 2, 3, 4, 5], 100) == [3, 4, 5]
    assert params.truncated([1, 2], 100) == [1, 2]
    assert SamplingParams().truncated([1, 2, 3], 2) == [1, 2, 3]
    # vLLM's -1: the context's length.
    context = SamplingParams(truncate_prompt_tokens=-1)
    assert context.prompt_keep(4) == 4 and params.prompt_keep(4) == 3
    assert context.truncated([1, 2, 3, 4, 5, 6], 4) == [3, 4, 5, 6]


def test_bad_words_take_a_word_or_a_list_and_need_the_token_history() -> None:
    assert SamplingParams(bad_words="spam").bad_words == ("spam",)
    params = SamplingParams(bad_words=["spam", " eggs"])
    assert params.bad_words == ("spam", " eggs") and params.needs_history


def test_bad_words_are_encoded_bare_and_with_a_leading_space_where_that_is_another_word() -> None:
    # vLLM's rule: " eggs" is its own token, so the mid-text form is banned too; " spam ham"
    # splits differently with the space (3 tokens against 2), so its bare form covers it.
    vocab = {
        "eggs": [10],
        " eggs": [11],
        "spam ham": [20, 21],
        " spam ham": [22, 23, 24],
        "x": [30],
        " x": [30],
    }
    encode = vocab.__getitem__
    assert bad_words_token_ids([" eggs", "spam ham", "x"], encode, 100) == (
        (10,),
        (11,),
        (20, 21),
        (30,),
    )
    with pytest.raises(InvalidSamplingParamsError, match="bad_words"):
        bad_words_token_ids(["eggs"], encode, 10)
