"""One HTTP request's choices: an engine request per (prompt, sample), run concurrently.

Every choice is validated (`Engine.stream` checks it and reserves its id) before any is queued,
so a bad prompt among several refuses the whole HTTP request and runs nothing. The choices then
stream together through one channel, in the order their tokens come; when the consumer goes
away (the client disconnected), every choice's request is aborted and its KV freed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from medha.engine import Engine
from medha.request import TokenEvent
from medha.sampling import SamplingParams


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_ids: list[int]
    stream: AsyncGenerator[TokenEvent, None]


def start_choices(
    engine: Engine,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    n: int,
    deadline: float | None,
    id_prefix: str,
) -> list[Choice]:
    """Validate the choices of `prompts` x `n` (index = prompt x n + sample, as OpenAI orders
    them); nothing is queued. With a seed, sample j of a prompt takes seed + j: n samples under
    one seed would all be the same."""
    choices: list[Choice] = []
    for prompt_index, prompt_ids in enumerate(prompts):
        for sample in range(n):
            index = prompt_index * n + sample
            sample_params = params
            if params.seed is not None and sample > 0:
                sample_params = dataclasses.replace(params, seed=params.seed + sample)
            stream = engine.stream(
                prompt_ids, sample_params, deadline, request_id=f"{id_prefix}-{index}"
            )
            choices.append(Choice(index, prompt_ids, stream))
    return choices


async def merged_events(choices: Sequence[Choice]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) of every choice, as they come. Closing this iterator early (or
    cancelling its consumer) aborts every unfinished choice; a choice that fails (its stream
    raises) aborts the others and the error propagates."""
    send, receive = anyio.create_memory_object_stream[tuple[int, TokenEvent]](math.inf)

    async def pump(choice: Choice, out: MemoryObjectSendStream[tuple[int, TokenEvent]]) -> None:
        async with out:
            async for event in choice.stream:
                await out.send((choice.index, event))

    try:
        async with anyio.create_task_group() as tasks:
            for choice in choices:
                tasks.start_soon(pump, choice, send.clone())
            send.close()  # the pumps hold clones: the channel ends when the last one finishes
            try:
                async with receive:
                    async for item in receive:
                        yield item
            finally:
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) from None


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside a task group's `group` (a failed choice, GeneratorExit), so that
    callers catch it by its type; the group itself if it holds several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group
