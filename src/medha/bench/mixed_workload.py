"""A mixed workload on a real model: one long document request plus a Poisson stream of short
chat requests whose lengths come from the Azure conversation trace (capped to fit a CPU)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from medha.model.tokenizer import Tokenizer
from medha.sim.traces import load_trace

_FILLER = (
    "the system schedules long prompts in chunks so that short requests arriving later are "
    "not stuck behind them while every token is computed exactly as the model defines it and "
    "the cache grows block by block across memory that other requests share fairly over time"
)
_WORDS = _FILLER.split()

_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Explain what a KV cache is in one sentence.",
    "Name a famous painting and its painter.",
    "How many legs does a spider have?",
    "Suggest a name for a friendly robot.",
)


@dataclass(frozen=True)
class MixedRequest:
    request_id: str
    kind: str
    """"long" or "short"."""
    arrival: float
    """Seconds after the run starts."""
    prompt_ids: tuple[int, ...]
    max_tokens: int


def build_mixed_workload(
    tokenizer: Tokenizer,
    *,
    long_tokens: int = 6144,
    long_output: int = 16,
    num_shorts: int = 24,
    short_rate: float = 0.5,
    short_prompt_cap: int = 256,
    short_output_cap: int = 24,
    long_arrival: float = 0.5,
    seed: int = 0,
) -> list[MixedRequest]:
    """The long request arrives at `long_arrival`; shorts arrive as a Poisson process of
    `short_rate` per second from t = 0, their lengths drawn from the conversation trace."""
    rng = random.Random(seed)
    trace = load_trace("conv")
    document = " ".join(rng.choice(_WORDS) for _ in range(long_tokens))
    doc_ids = tokenizer.encode(document, add_special_tokens=False)[: long_tokens - 64]
    long_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Summarize this document: " + tokenizer.decode(doc_ids)}]
    )
    requests = [MixedRequest("long-0", "long", long_arrival, tuple(long_prompt), long_output)]
    now = 0.0
    for index in range(num_shorts):
        now += rng.expovariate(short_rate)
        row = rng.randrange(len(trace))
        prompt_len = max(24, min(trace.prompt_tokens[row], short_prompt_cap))
        output = max(4, min(trace.output_tokens[row], short_output_cap))
        question = tokenizer.apply_chat_template(
            [{"role": "user", "content": rng.choice(_QUESTIONS)}]
        )
        filler = [
            tokenizer.encode(" " + rng.choice(_WORDS), add_special_tokens=False)[0]
            for _ in range(max(0, prompt_len - len(question)))
        ]
        # Context first, question last: what a chat with history looks like.
        prompt = (filler + question)[-prompt_len:] if filler else question
        requests.append(MixedRequest(f"short-{index}", "short", now, tuple(prompt), output))
    return sorted(requests, key=lambda r: r.arrival)
