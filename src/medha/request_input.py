"""What a caller may pass as a prompt or as request ids, turned into token ids or a list of
ids, or refused with a typed error (medha.errors) before anything is queued."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from medha.errors import InvalidRequestError, InvalidSamplingParamsError
from medha.sampling import SamplingParams
from medha.scheduler.prefix_cache import salted_root


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def prompt_token_ids(
    prompt: object, tokenizer: _Encoder, vocab_size: int, keep: int | None = None
) -> list[int]:
    """A text (encoded with `tokenizer`), or token ids (a list, a tuple, a 1-D numpy array or
    tensor), as token ids the model has: [0, vocab_size). `keep`
    (SamplingParams.truncate_prompt_tokens): at most that many, the prompt's last ones; a
    text keeps the special tokens its tokenizer adds in front (a BOS), as a tokenizer
    truncating from the left does."""
    if not isinstance(prompt, str) and callable(getattr(prompt, "tolist", None)):
        prompt = prompt.tolist()  # type: ignore[attr-defined]  # a numpy array or a tensor
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        check_unicode(prompt, "the prompt")
        ids = tokenizer.encode(prompt)
        if not _in_vocabulary(ids, vocab_size):
            beyond = [token for token in ids if token >= vocab_size]
            # A token the tokenizer has and the model does not (transformers' GGUF
            # conversion adds <|endoftext|> to Llama-3 files), spelled out in the text.
            raise InvalidRequestError(
                f"the prompt's text encodes to token ids the model does not have: {beyond} "
                f"(its vocabulary is [0, {vocab_size}))"
            )
    elif isinstance(prompt, list | tuple):
        ids = list(prompt)  # a copy: the caller may reuse its list
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            if not (set(map(type, chunk)) == {int} and _in_vocabulary(chunk, vocab_size)):
                ids[start : start + _CHUNK] = _checked_one_by_one(chunk, vocab_size)
    else:
        raise InvalidRequestError(
            f"prompt must be a str or a list of token ids (or a 1-D array of them), got "
            f"{type(prompt).__name__}"
        )
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if keep is None or len(ids) <= keep:
        return ids
    if isinstance(prompt, str):
        return _truncated_text(prompt, ids, tokenizer, keep)
    return ids[-keep:]


_CHUNK = 65_536
"""Ids checked per pass of C code (~3 ms): between passes, other threads get the GIL. A
long prompt is checked on a worker thread, and a pure-Python loop there would hand the GIL
back only every 5 ms, stalling the event loop and the model thread at every step."""


def _in_vocabulary(ids: list[int], vocab_size: int) -> bool:
    """Whether every id of `ids` (Python ints) is in [0, vocab_size)."""
    return all(
        min(chunk) >= 0 and max(chunk) < vocab_size
        for chunk in (ids[start : start + _CHUNK] for start in range(0, len(ids), _CHUNK))
    )


def _checked_one_by_one(tokens: Sequence[object], vocab_size: int) -> list[int]:
    """`tokens` as Python ints (from numpy's integers too), or the error of the first that is
    not a token id of the vocabulary."""
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise InvalidRequestError(
                f"a token-id prompt must hold ints, found {type(token).__name__}"
            )
        if not 0 <= token < vocab_size:  # type: ignore[operator]  # an Integral
            raise InvalidRequestError(
                f"token id {token} is outside the vocabulary [0, {vocab_size})"
            )
    return [int(token) for token in tokens]  # type: ignore[call-overload]  # Integrals


def _truncated_text(text: str, ids: list[int], tokenizer: _Encoder, keep: int) -> list[int]:
    """The last `keep` of a text's `ids`, keeping the tokens its tokenizer put before the
    text's own (a BOS)."""
    own = tokenizer.encode(text, add_special_tokens=False)
    added = len(ids) - len(own)
    if added <= 0 or ids[added:] != own:
        return ids[-keep:]  # not a prefix the tokenizer adds: cut like token ids
    if keep <= added:
        raise InvalidSamplingParamsError(
            f"SamplingParams.truncate_prompt_tokens={keep}: the tokenizer adds {added} special "
            f"token(s) before the text; keep more than that"
        )
    return ids[:added] + own[len(own) - (keep - added) :]


def check_unicode(text: str, what: str) -> None:
    """InvalidRequestError if `text` holds a lone surrogate: bytes that were not UTF-8, as
    Python decodes a command line's (`caf\\xe9` in Latin-1). No tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid UTF-8 text (character {exc.start}: "
            f"{text[exc.start : exc.end]!r}); encode it as UTF-8"
        ) from None


def request_ids(request_id: object) -> list[str]:
    """One id, or an iterable of them (not bytes, not a mapping), as a list; else
    InvalidRequestError."""
    if isinstance(request_id, str):
        return [request_id]
    if isinstance(request_id, bytes | bytearray | Mapping) or not isinstance(request_id, Iterable):
        raise InvalidRequestError(
            f"a request id is a str (or an iterable of them), got {request_id!r}"
        )
    ids = list(request_id)
    for one in ids:
        if not isinstance(one, str):
            raise InvalidRequestError(f"a request id is a str, got {one!r}")
    return ids


def cache_salt_root(cache_salt: object) -> bytes:
    """A request's `cache_salt` (a non-empty str, or None: vLLM's) as the digest its prefix
    caching blocks chain from (medha.scheduler.prefix_cache.salted_root)."""
    if cache_salt is None:
        return b""
    if not isinstance(cache_salt, str) or not cache_salt:
        raise InvalidRequestError(f"cache_salt must be a non-empty str or None, got {cache_salt!r}")
    check_unicode(cache_salt, "cache_salt")
    return salted_root(cache_salt)


def checked_sampling(sampling: object, defaults: dict[str, Any]) -> SamplingParams:
    """`sampling`, or without one SamplingParams of the model's defaults (`defaults`)."""
    if sampling is None:
        return SamplingParams(**defaults)
    if not isinstance(sampling, SamplingParams):
        raise InvalidRequestError(
            f"sampling must be a medha.SamplingParams or None, got {type(sampling).__name__}"
        )
    return sampling
