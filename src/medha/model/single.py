"""Run ONE request to completion on a ModelRunner, without a scheduler.

This is the simplest correct use of the runner: prefill in fixed chunks, then decode token by
token, with the real sampler, detokenizer and stop conditions. `medha generate` streams through
it, and benchmarks use it as the "request alone on the machine" baseline.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medha.detokenizer import Decoder
from medha.errors import InvalidSamplingParamsError, PromptTooLongError
from medha.model.request_sampling import RequestSampling, sample_requests
from medha.model.runner import ModelRunner, StepSeq
from medha.output_text import OutputText
from medha.request import TokenLogprob
from medha.sampling import SamplingParams, SamplingSetup

if TYPE_CHECKING:
    from medha.grammar import GrammarMatcher


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    token_id: int
    text: str
    """Text that became final with this token (may be empty: held back for a stop string or an
    unfinished UTF-8 character)."""
    finish_reason: str | None
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] | None = None


def generate_single(
    runner: ModelRunner,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    decoder: Decoder,
    eos_token_ids: Sequence[int] = (),
    prefill_chunk: int = 512,
    grammar: GrammarMatcher | None = None,
) -> Iterator[GeneratedToken]:
    """Yield the request's tokens as they are produced; the last one has a finish_reason.
    `grammar`: params.structured_outputs compiled for the model's tokenizer (required with
    one: medha.grammar.GrammarCompiler(tokenizer, vocab_size).matcher(...))."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if params.prompt_logprobs is not None:
        raise InvalidSamplingParamsError(
            "generate_single reports no prompt logprobs: run the request on a medha.Engine"
        )
    if params.bad_words:
        raise InvalidSamplingParamsError(
            "generate_single has no tokenizer to encode bad_words: run the request on a "
            "medha.Engine"
        )
    prompt_ids = params.truncated(list(prompt_ids), runner.arch.context_len)
    if (params.structured_outputs is None) != (grammar is None):
        raise InvalidSamplingParamsError(
            "generate_single needs params.structured_outputs compiled as `grammar` (a "
            "medha.grammar.GrammarCompiler's matcher), and a grammar only with them"
        )
    params.check_vocab(runner.arch.vocab_size)
    capacity = runner.kv_cache.capacity_tokens
    if params.max_tokens is None:
        # As the engine: what the model's context and the KV cache leave after the prompt.
        room = min(capacity, runner.arch.context_len) - len(prompt_ids)
        if room < max(1, params.min_tokens):
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens: the context ({runner.arch.context_len}"
                f") and the KV cache ({capacity} tokens) leave no room for "
                f"{max(1, params.min_tokens)} token(s)"
            )
        max_tokens = room
    else:
        max_tokens = params.max_tokens
    total = len(prompt_ids) + max_tokens
    if total > capacity:
        raise PromptTooLongError(
            f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) = {total} tokens "
            f"exceed the KV cache ({capacity} tokens)"
        )
    # Alone in the cache: the request owns blocks 0..n-1.
    table = list(range(-(-total // runner.block_size)))
    sampling = RequestSampling(SamplingSetup(params, len(prompt_ids), tuple(eos_token_ids)))
    output = OutputText(decoder, prompt_ids, params, eos_token_ids, max_tokens)

    start = 0
    while True:
        end = min(start + prefill_chunk, len(prompt_ids))
        is_last = end == len(prompt_ids)
        sampling.observe(start, prompt_ids[start:end])
        logits = runner.step([StepSeq(prompt_ids[start:end], start, table, sample=is_last)])
        start = end
        if is_last:
            break
    position = len(prompt_ids)
    while True:
        mask = None if grammar is None else [grammar.next_mask()]
        out = sample_requests(logits, [sampling], mask)
        token = out.token_ids[0]
        update = output.push(token, grammar is not None and grammar.advance(token))
        yield GeneratedToken(
            token, update.text, update.finish_reason, out.logprobs[0], out.top_logprobs[0]
        )
        if update.finished:
            return
        sampling.observe(position, [token])
        logits = runner.step([StepSeq([token], position, table)])
        position += 1
