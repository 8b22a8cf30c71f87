"""How many tokens a request may generate: what the context and the KV cache leave after its
prompt. Checked before anything is queued, with the error that says which limit it hit."""

from __future__ import annotations

from medha.errors import PromptTooLongError, RequestTooLargeError
from medha.sampling import SamplingParams
from medha.scheduler import Scheduler


def output_limit(
    prompt_len: int, params: SamplingParams, max_model_len: int, scheduler: Scheduler
) -> int:
    """params.max_tokens if the context and the KV cache hold that many after the prompt
    (else a typed error); with max_tokens None, as many as they hold (vLLM's None; a KV cache
    smaller than the context caps it too)."""
    if params.max_tokens is None:
        return _room_left(prompt_len, params, max_model_len, scheduler)
    total = prompt_len + params.max_tokens
    if total > max_model_len:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: "
            f"{total} tokens exceed the context of {max_model_len}"
        )
    # The scheduler's own rule: under KVP a request may use each group only up to its
    # per-group limit, not the sum of every group's blocks.
    try:
        scheduler.check_fits(prompt_len, params.max_tokens)
    except RequestTooLargeError as exc:
        raise RequestTooLargeError(f"{exc} (raise num_blocks or kv_cache_gib)") from None
    return params.max_tokens


def _room_left(
    prompt_len: int, params: SamplingParams, max_model_len: int, scheduler: Scheduler
) -> int:
    most = scheduler.max_request_tokens()
    room = min(max_model_len, most) - prompt_len
    wanted = max(1, params.min_tokens)
    if room >= wanted:
        return room
    if max_model_len - prompt_len < wanted:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens: the context of {max_model_len} leaves no "
            f"room for {wanted} token(s)"
        )
    raise RequestTooLargeError(
        f"the prompt has {prompt_len} tokens: a request holds at most {most} tokens of KV, "
        f"no room for {wanted} token(s) (raise num_blocks or kv_cache_gib)"
    )
