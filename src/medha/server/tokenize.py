"""POST /tokenize and /detokenize, as vLLM's server has them: a client counts a prompt's tokens
(will this document fit the context?) or reads its ids before sending it.

/tokenize takes a completion prompt ({"prompt": text}) or chat messages ({"messages": [...]})
and answers {"count", "max_model_len", "tokens"}: the ids /v1/completions or
/v1/chat/completions would run for it. With "return_token_strs": true it adds "token_strs",
the tokenizer's piece for each id. /detokenize takes {"tokens": [...]} and answers
{"prompt": text}, special tokens included (as vLLM). A long text, or a long list of ids, is
handled off the event loop, as the completions endpoints handle a long prompt.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from medha.engine import Engine
from medha.errors import InvalidRequestError
from medha.server.prompts import chat_prompt_ids, off_loop_if_long, text_ids


class TokenizeRequest(BaseModel):
    """POST /tokenize: `prompt` or `messages`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    """With `messages`: end with the template's start of the assistant's turn (as chat does)."""
    add_special_tokens: bool | None = None
    """With `prompt`: the tokenizer's own special tokens (a BOS); default true, as
    /v1/completions encodes. With `messages` only false: the chat template writes them."""
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]


async def tokenize(engine: Engine, body: TokenizeRequest) -> dict[str, Any]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give `prompt` (a text) or `messages` (a chat), one of them")
    if body.messages is not None:
        if body.add_special_tokens:
            raise InvalidRequestError(
                "add_special_tokens with messages is not supported: the chat template writes "
                "the special tokens"
            )
        if not engine.tokenizer.has_chat_template:
            raise InvalidRequestError("the model has no chat template")
        ids = await chat_prompt_ids(engine, body.messages, body.add_generation_prompt)
    else:
        assert body.prompt is not None
        ids = await text_ids(engine, body.prompt, body.add_special_tokens is not False)
    result: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len}
    result["tokens"] = ids
    if body.return_token_strs:
        pieces = engine.tokenizer.hf_tokenizer.convert_ids_to_tokens
        result["token_strs"] = await off_loop_if_long(ids, pieces, ids)
    return result


async def detokenize(engine: Engine, body: DetokenizeRequest) -> dict[str, Any]:
    if not body.tokens:
        return {"prompt": ""}
    return {"prompt": await off_loop_if_long(body.tokens, _text_of, engine, body.tokens)}


def _text_of(engine: Engine, ids: list[int]) -> str:
    engine.tokenize(ids)  # ids the model lacks: InvalidRequestError, as for a prompt
    return str(engine.tokenizer.decode(ids, skip_special_tokens=False))
