"""An HTTP request's prompts as the engine's token ids, tokenized off the event loop when long.

Tokenizing a long text holds its thread for seconds (a 1M-token document: ~2.3 s on a 2-core
CPU), and on the event loop that stalls every stream the server is sending. So a long prompt
is tokenized on a worker thread (medha.request_prompt.run_off_loop, one at a time), and a short
one inline: a short request never waits behind a long one's tokenization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from medha.engine import Engine
from medha.request_input import check_unicode
from medha.request_prompt import is_long, run_off_loop
from medha.sampling import SamplingParams
from medha.server.tool_protocol import ToolDefinition, template_tools

T = TypeVar("T")


async def completion_prompt_ids(
    engine: Engine,
    prompts: Sequence[str | list[int]],
    params: SamplingParams | None,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Each prompt's ids (InvalidRequestError and its kind for one that cannot be a prompt); a
    text's with or without the tokenizer's special tokens (a BOS)."""
    return [
        await off_loop_if_long(prompt, engine.tokenize, prompt, params)
        if add_special_tokens or not isinstance(prompt, str)
        else await off_loop_if_long(prompt, _plain_ids, engine, prompt, params)
        for prompt in prompts
    ]


class ChatInput(Protocol):
    """What a request body says of its chat (chat completions', /tokenize's)."""

    messages: Any  # a list of message dicts (None on a /tokenize body of a prompt)
    add_generation_prompt: bool
    tools: list[ToolDefinition] | None
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None


async def chat_prompt_ids(
    engine: Engine, chat: ChatInput, params: SamplingParams | None = None
) -> list[int]:
    """The ids of `chat`'s messages rendered by the model's chat template, with its tools for
    it to show the model (Tokenizer.apply_chat_template). Rendering is cheap (a string join,
    even for a long document); encoding the result is what takes time."""
    return (await chat_prompt(engine, chat, params))[1]


async def chat_prompt(
    engine: Engine, chat: ChatInput, params: SamplingParams | None = None
) -> tuple[str, list[int]]:
    """`chat`'s prompt as the template rendered it, and its ids (chat_prompt_ids)."""
    text = engine.tokenizer.apply_chat_template(
        chat.messages,
        chat.add_generation_prompt,
        tokenize=False,
        tools=template_tools(chat.tools),
        continue_final_message=chat.continue_final_message,
        chat_template_kwargs=chat.chat_template_kwargs,
    )
    # Without the tokenizer's special tokens, as transformers encodes a rendered template: it
    # writes its own (a BOS), and the tokenizer's would be a second one.
    return text, await off_loop_if_long(text, _plain_ids, engine, text, params)


def _plain_ids(engine: Engine, text: str, params: SamplingParams | None) -> list[int]:
    """`text`'s ids without the tokenizer's special tokens, checked as a prompt."""
    check_unicode(text, "the prompt")  # what the tokenizer cannot take: typed, as in tokenize
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return engine.tokenize(ids, params)


async def off_loop_if_long(prompt: object, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, off the event loop if `prompt` is long."""
    if is_long(prompt):
        return await run_off_loop(fn, *args)
    return fn(*args)
