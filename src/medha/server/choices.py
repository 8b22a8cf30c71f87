"""One HTTP request's choices: an engine request per (prompt, sample), run concurrently.

Every choice is validated (`Engine.stream` checks it and reserves its id) before any is queued,
so a bad prompt among several refuses the whole HTTP request and runs nothing. The choices then
stream together through one queue, in the order their tokens come; when the consumer goes away
(the client disconnected), every choice's request is aborted and its KV freed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import anyio

from medha.engine import Engine
from medha.request import TokenEvent
from medha.sampling import SamplingParams
from medha.server.echo import EchoedPrompt, without_output

_SEEDS = 1 << 64  # SamplingParams' seeds are 64-bit unsigned


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_ids: list[int]
    stream: AsyncGenerator[TokenEvent, None]
    echo: EchoedPrompt | None = None
    """The prompt, which the choice's text starts with (completions' `echo`)."""
    prompt_only: bool = False
    """Only the prompt is wanted (`echo` with `max_tokens: 0`): the output is not shown."""


async def start_choices(
    engine: Engine,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    n: int,
    deadline: float | None,
    id_prefix: str,
    echoes: Sequence[EchoedPrompt] | None = None,
    prompt_only: bool = False,
    *,
    cache_salt: str | None = None,
) -> list[Choice]:
    """Validate the choices of `prompts` x `n` (index = prompt x n + sample, as OpenAI orders
    them); nothing is queued, and if one is refused the others' ids are released. With a seed,
    sample j of a prompt takes seed + j: n samples under one seed would all be the same.
    `echoes`: each prompt echoed, and with `prompt_only` nothing else (see Choice)."""
    choices: list[Choice] = []
    try:
        for prompt_index, prompt_ids in enumerate(prompts):
            for sample in range(n):
                index = prompt_index * n + sample
                sample_params = params
                if params.seed is not None and sample > 0:
                    seed = (params.seed + sample) % _SEEDS
                    sample_params = dataclasses.replace(params, seed=seed)
                stream = engine.stream(
                    prompt_ids,
                    sample_params,
                    deadline,
                    request_id=f"{id_prefix}-{index}",
                    cache_salt=cache_salt,
                )
                echo = None if echoes is None else echoes[prompt_index]
                choices.append(Choice(index, prompt_ids, stream, echo, prompt_only))
    except BaseException:
        for choice in choices:
            await choice.stream.aclose()  # never iterated: nothing was queued
        raise
    return choices


_DONE = object()


async def merged_events(
    choices: Sequence[Choice],
) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """(choice index, event) of every choice, as they come. Closing this iterator early (or
    cancelling its consumer) aborts every unfinished choice before it returns; a choice whose
    stream raises aborts the others, and its error is raised here, as itself.

    Each choice streams from its own task into a queue, and no cancel scope spans a `yield`:
    the consumer (an HTTP response) awaits other things between events, where a scope's
    cancellation would land in the wrong place.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            # aclosing: a cancelled pump closes its stream now, which aborts its request.
            async with aclosing(choice.stream) as stream:
                async for event in stream:
                    shown = without_output(event) if choice.prompt_only else event
                    queue.put_nowait((choice.index, shown))
        except Exception as error:
            queue.put_nowait(error)
        finally:
            queue.put_nowait(_DONE)

    pumps = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(pumps)
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]  # (index, event), as put
    finally:
        for task in pumps:
            task.cancel()
        # Shielded: inside a cancelled anyio scope (Starlette's disconnect listener), this wait
        # would be cancelled too, cutting the pumps' cleanup short.
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*pumps, return_exceptions=True)
