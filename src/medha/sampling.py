"""SamplingParams: how one request turns logits into tokens and when it stops.

Names and defaults follow vLLM's `SamplingParams` so that users carry over what they know.
Pure Python (no torch): the scheduler and the API layer validate requests without a model.
Every field is checked once, at construction; a bad value raises InvalidSamplingParamsError
naming the field and the value, before the request is queued.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

from medha.errors import InvalidSamplingParamsError
from medha.structured_outputs import StructuredOutputsParams

# vLLM treats temperatures below this as zero: dividing logits by ~0 only overflows, and the
# argmax is the limit of the distribution anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

# Unsigned 64-bit seeds, as torch generators take; every bit counts (medha.model.sampler).
_MAX_SEED = 2**64 - 1

# vLLM's default `max_logprobs`: each one costs a top-k over the vocabulary and a list entry per
# token on the event loop.
MAX_LOGPROBS = 20

# OpenAI's (and vLLM's) range for presence and frequency penalties.
_MAX_ADDITIVE_PENALTY = 2.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping parameters of one request (vLLM's names and defaults).

    Attributes:
        max_tokens: most tokens to generate (>= 1); None: as many as the context and the KV
            cache leave after the prompt (vLLM's None, which the OpenAI API calls omitting it).
        temperature: 0.0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens; 0 or -1 disables.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability mass is
            >= top_p, in (0, 1]; 1.0 disables.
        min_p: drop tokens whose probability is below min_p times the top token's, in [0, 1].
        seed: seed of this request's own random generator (64 bits: 0 to 2**64 - 1, or a
            signed one, -2**63 to -2, taken as its two's complement); None, or -1 as in vLLM,
            draws a fresh one.
        stop: strings that end the request; the text is cut before the first one. A single
            str or any sequence of str is accepted and stored as a tuple.
        stop_token_ids: token ids that end the request (even when ignore_eos is set).
        ignore_eos: keep generating past the end-of-sequence token.
        logprobs: None for none; otherwise the log-probability of each chosen token, and of the
            `logprobs` most likely tokens at its position (0 to 20; 0: the chosen token's
            only). Under the model's raw distribution, before penalties, temperature and
            filtering, as vLLM reports them.
        prompt_logprobs: None for none; otherwise the log-probability of each prompt token
            given the tokens before it (the first has none), and the `prompt_logprobs` most
            likely tokens at each position (0 to 20), under the model's raw distribution: what
            perplexity and multiple-choice scoring need. Such a request computes its whole
            prompt: it takes nothing from the prefix cache, though it fills it (as vLLM).
        include_stop_str_in_output: keep the matched stop string (or the text of the stop
            token or eos that ended the request) at the end of the output.
        skip_special_tokens: leave the tokenizer's special tokens (a chat template's markers,
            eos) out of the output's text, as vLLM does by default; False shows them, and stop
            strings may then match their text. The token ids are the same either way.
        min_tokens: generate at least this many tokens before eos, a stop token or a stop
            string may end the request (0 to max_tokens; with max_tokens None, a request whose
            context leaves fewer is refused): until then eos (even with ignore_eos, as in
            vLLM) and stop_token_ids are never sampled, and a stop string counts only if it
            ends in the text of a later token.
        repetition_penalty: > 0; 1.0 disables. Every token that appeared in the prompt or the
            output so far has its logit divided by it if positive, multiplied if not (HF's and
            vLLM's rule): > 1 discourages repeats.
        presence_penalty: in [-2, 2]; subtracted from the logit of every token the output
            contains so far (the prompt does not count, as in OpenAI's API and vLLM).
        frequency_penalty: in [-2, 2]; subtracted once per occurrence in the output so far.
        logit_bias: added to the given tokens' logits ({token_id: bias}, bias clamped to
            [-100, 100] as OpenAI and vLLM do; ids may be digit strings, as in OpenAI's JSON);
            stored as (token_id, bias) pairs by id.
        allowed_token_ids: only these tokens may be sampled (None: any); not empty; stored
            sorted, without repeats.
        truncate_prompt_tokens: None, or k >= 1: the request runs only the last k tokens of
            its prompt (left truncation, as vLLM's): a long document keeps its end, next to
            the question. -1 (vLLM's): k is the engine's context length (max_model_len). A text keeps the special tokens its tokenizer adds in front (a BOS)
            among its k. Its Completion's prompt_token_ids, prompt logprobs and length checks
            are those of the truncated prompt.
        bad_words: words never generated (vLLM's rule): each is tokenized without its leading
            whitespace and, where that gives as many tokens but another first one, with one
            leading space (the word mid-text); the last token of a form is never sampled right
            after the output's tokens spell the rest of it (a one-token form: never at all).
            Stored as a tuple; a single str is one word.
        structured_outputs: None, or a medha.StructuredOutputsParams (or a dict of its
            fields): the output follows a JSON schema, a regex, a choice or a grammar. Each
            step, tokens that would break it get -inf before everything else, and the request
            ends as soon as its output is complete (docs/engine.md, "Structured outputs").

    structured_outputs, allowed_token_ids, logit_bias, the penalties, min_tokens and bad_words
    apply in that order, before temperature and the filters, and to greedy requests too (they
    change the argmax).
    Token ids are checked against the model's vocabulary when a request is submitted.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    truncate_prompt_tokens: int | None = None
    bad_words: tuple[str, ...] = ()
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalising a field (numpy scalars to int and float, stop lists to
        # tuples) means going around __setattr__.
        normalise = partial(object.__setattr__, self)
        if self.max_tokens is not None:
            normalise("max_tokens", _as_int("max_tokens", self.max_tokens, minimum=1))
        normalise("temperature", _as_float("temperature", self.temperature))
        if self.temperature < 0:
            _fail("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        normalise("top_k", _as_int("top_k", self.top_k, minimum=-1))
        normalise("top_p", _as_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "must be in (0, 1]")
        normalise("min_p", _as_float("min_p", self.min_p))
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", self.min_p, "must be in [0, 1]")
        if self.seed is not None:
            seed = _as_int("seed", self.seed, minimum=-(2**63))
            if seed > _MAX_SEED:
                _fail("seed", seed, "must fit in 64 bits")
            # vLLM's seeds are signed 64-bit: -1 is no seed (what UIs send for "random"), as
            # vLLM reads it; another negative one is its 64 bits unsigned.
            normalise("seed", None if seed == -1 else seed % 2**64)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        if self.logprobs is False:
            # It was a bool, False by default, before medha took vLLM's meaning: False still
            # means none.
            normalise("logprobs", None)
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(self, name)
            if count is None:
                continue
            if isinstance(count, bool):
                _fail(
                    name,
                    count,
                    "must be None or a count of top tokens: 0 reports each token's "
                    "log-probability only"
                    + (" (what logprobs=True did)" if name == "logprobs" else "")
                    + ", N also the N most likely",
                )
            normalise(name, _as_int(name, count, minimum=0))
            if getattr(self, name) > MAX_LOGPROBS:
                _fail(name, count, f"must be <= {MAX_LOGPROBS}")
        normalise("min_tokens", _as_int("min_tokens", self.min_tokens, minimum=0))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        normalise("repetition_penalty", _as_float("repetition_penalty", self.repetition_penalty))
        if self.repetition_penalty <= 0:
            _fail("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            normalise(name, _as_float(name, getattr(self, name)))
            if abs(getattr(self, name)) > _MAX_ADDITIVE_PENALTY:
                _fail(name, getattr(self, name), "must be in [-2, 2]")
        normalise("stop", _normalise_strings("stop", self.stop))
        normalise("bad_words", _normalise_strings("bad_words", self.bad_words, words=True))
        normalise("stop_token_ids", _normalise_token_ids("stop_token_ids", self.stop_token_ids))
        normalise("logit_bias", _normalise_logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            allowed = _normalise_token_ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                _fail("allowed_token_ids", self.allowed_token_ids, "must not be empty")
            normalise("allowed_token_ids", tuple(sorted(set(allowed))))
        if self.truncate_prompt_tokens is not None:
            keep = _as_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=-1)
            if keep == 0:
                _fail("truncate_prompt_tokens", keep, "must be -1 (the context) or >= 1")
            normalise("truncate_prompt_tokens", keep)
        if self.structured_outputs is not None:
            normalise("structured_outputs", StructuredOutputsParams.coerce(self.structured_outputs))

    @classmethod
    def greedy(cls, max_tokens: int | None = 16, **overrides: Any) -> SamplingParams:
        """Greedy decoding (temperature 0) of at most `max_tokens` tokens."""
        return cls(max_tokens=max_tokens, temperature=0.0, **overrides)

    def prompt_keep(self, max_model_len: int) -> int | None:
        """How many of its prompt's last tokens the request runs (None: all of them), in a
        context of `max_model_len` tokens (truncate_prompt_tokens=-1's)."""
        keep = self.truncate_prompt_tokens
        return max_model_len if keep == -1 else keep

    def truncated(self, prompt_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt the request runs (`prompt_keep`'s last tokens)."""
        keep = self.prompt_keep(max_model_len)
        return prompt_ids if keep is None or len(prompt_ids) <= keep else prompt_ids[-keep:]

    @property
    def is_greedy(self) -> bool:
        """True when the sampler takes the argmax (top_k/top_p/min_p/seed are then unused)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def check_vocab(self, vocab_size: int) -> None:
        """Raise InvalidSamplingParamsError if a token id in logit_bias or allowed_token_ids is
        not in a vocabulary of `vocab_size` (vLLM refuses them too)."""
        for field, ids in (
            ("logit_bias", [token for token, _ in self.logit_bias]),
            ("allowed_token_ids", self.allowed_token_ids or ()),
        ):
            outside = [token for token in ids if token >= vocab_size]
            if outside:
                _fail(field, outside, f"token ids must be < the vocabulary size ({vocab_size})")

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def needs_history(self) -> bool:
        """Whether sampling depends on the tokens so far (penalties, min_tokens, bad words)."""
        return self.has_penalties or self.min_tokens > 0 or bool(self.bad_words)


def _fail(field: str, value: object, problem: str) -> NoReturn:
    raise InvalidSamplingParamsError(f"SamplingParams.{field}={value!r}: {problem}")


def _as_int(field: str, value: object, *, minimum: int) -> int:
    """`value` as an int (numpy's integers included), checked against `minimum`."""
    # bool is an int subclass; `max_tokens=True` is a bug, not a request for one token.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(field, value, f"must be an int, got {type(value).__name__}")
    if value < minimum:
        _fail(field, value, f"must be >= {minimum}")
    return int(value)


def _as_float(field: str, value: object) -> float:
    """`value` as a finite float (numpy's numbers included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(field, value, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        _fail(field, value, "must be finite")
    return float(value)


def _normalise_strings(field: str, value: object, *, words: bool = False) -> tuple[str, ...]:
    """`value` (None, a str, or a list/tuple of non-empty str; `words`: not blank either) as a
    tuple of str."""
    if value is None:
        return ()
    items: Iterable[object]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, list | tuple):
        items = value
    else:
        _fail(field, value, "must be a str or a list/tuple of str")
    result = []
    for item in items:
        if not isinstance(item, str):
            _fail(field, value, f"every string must be a str, got {type(item).__name__}")
        elif not (item.strip() if words else item):
            _fail(field, value, "words must not be blank" if words else "must not be empty")
        elif words and not _is_utf8(item):  # a lone surrogate: no tokenizer encodes it
            _fail(field, value, "words must be valid UTF-8 text (no lone surrogates)")
        result.append(item)
    return tuple(result)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _normalise_token_ids(field: str, ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    # A numpy array (or a torch tensor) of ids is its list.
    items = ids.tolist() if hasattr(ids, "tolist") else ids
    if not isinstance(items, list | tuple):
        _fail(field, ids, "must be a list/tuple of int")
    return tuple(_token_id(field, ids, item) for item in items)


def _token_id(field: str, value: object, item: object) -> int:
    if isinstance(item, bool) or not isinstance(item, numbers.Integral):
        _fail(field, value, f"token ids must be int, got {type(item).__name__}")
    if item < 0:
        _fail(field, value, f"token ids must be >= 0, got {item}")
    return int(item)


# OpenAI's (and vLLM's) range for a logit bias: beyond it, a token is as good as banned or forced.
_MAX_LOGIT_BIAS = 100.0


def _normalise_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items = list(bias.items())
    elif isinstance(bias, list | tuple) and all(
        isinstance(pair, list | tuple) and len(pair) == 2 for pair in bias
    ):
        items = [tuple(pair) for pair in bias]
    else:
        _fail("logit_bias", bias, "must be a dict {token_id: bias}")
    result: dict[int, float] = {}
    for token, value in items:
        if isinstance(token, str) and token.isascii() and token.removeprefix("-").isdigit():
            # OpenAI's JSON has the ids as strings ("50256"); vLLM takes them as ints too.
            token = int(token)
        token_id = _token_id("logit_bias", bias, token)
        if token_id in result:
            _fail("logit_bias", bias, f"token id {token_id} appears twice")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail("logit_bias", bias, f"biases must be numbers, got {type(value).__name__}")
        if not math.isfinite(value):
            _fail("logit_bias", bias, "biases must be finite")
        number = float(value)
        result[token_id] = min(max(number, -_MAX_LOGIT_BIAS), _MAX_LOGIT_BIAS)
    return tuple(sorted(result.items()))


@dataclass(frozen=True, slots=True)
class SamplingSetup:
    """What the stage that samples is told of a request, once, with its first step: its params,
    and what penalties and min_tokens need besides (where the prompt ends, the eos ids)."""

    params: SamplingParams
    prompt_len: int
    eos_token_ids: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None
    """The whole prompt, for penalties (params.needs_history): its first step may start past
    a prefix cache hit, whose tokens the stage never sees; and for prompt logprobs (a chunk's
    last row predicts the next chunk's first token)."""

    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    """params.bad_words as token ids (`bad_words_token_ids`)."""

    @property
    def min_tokens_stop_ids(self) -> tuple[int, ...]:
        """The ids min_tokens keeps from being sampled: the stop tokens and eos, even with
        ignore_eos (vLLM's set: "before EOS or stop_token_ids can be generated")."""
        return tuple(sorted({*self.params.stop_token_ids, *self.eos_token_ids}))


def bad_words_token_ids(
    words: Sequence[str], encode: Callable[[str], list[int]], vocab_size: int
) -> tuple[tuple[int, ...], ...]:
    """`words` (SamplingParams.bad_words) as the token sequences the sampler bans, by vLLM's
    rule: each word without its leading whitespace, as at the start of a text; and with one
    leading space, as in mid-text, where that form has as many tokens but another first one
    (else the space is a token of its own, and the bare form covers the word). `encode` must
    add no special tokens. InvalidSamplingParamsError for a word with an id beyond the model's
    vocabulary (a tokenizer may hold tokens the model lacks)."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        spaced = tuple(encode(" " + word.lstrip()))
        forms = [bare]
        if len(spaced) == len(bare) and spaced[:1] != bare[:1]:
            forms.append(spaced)
        for form in forms:
            if any(token >= vocab_size for token in form):
                _fail("bad_words", word, f"encodes to ids beyond the vocabulary ({vocab_size})")
            if form and form not in sequences:
                sequences.append(form)
    return tuple(sequences)
