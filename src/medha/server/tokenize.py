"""POST /tokenize and /detokenize, as vLLM's server has them: a client counts a prompt's tokens
(will this document fit the context?) or reads its ids before sending it.

/tokenize takes a completion prompt ({"prompt": text}) or chat messages ({"messages": [...]})
and answers {"count", "max_model_len", "tokens", "token_strs"}: the ids /v1/completions or
/v1/chat/completions would run for it, and with "return_token_strs": true the tokenizer's
piece for each (else null). /detokenize takes {"tokens": [...]} and answers {"prompt": text},
special tokens included (as vLLM). A long text, or a long list of ids, is handled off the event
loop, as the completions endpoints handle a long prompt; the answer is written as JSON at once,
not through FastAPI's encoder (a Python walk over every id: ~2 s on the loop for 900K ids).
Fields medha does not do are refused as the completions endpoints refuse them
(protocol.UNSUPPORTED: `chat_template`, `continue_final_message`, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from medha.engine import Engine
from medha.errors import InvalidRequestError
from medha.server.prompts import chat_prompt_ids, completion_prompt_ids, off_loop_if_long
from medha.server.protocol import check_no_special_tokens, ignored_fields, null_is_the_default
from medha.server.tool_protocol import ToolDefinition


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
    tools: list[ToolDefinition] | None = None
    """With `messages`: the tools the chat template shows the model (as chat completions)."""
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    """With `messages`, as chat completions take them."""

    _defaults = field_validator(
        "add_generation_prompt", "return_token_strs", "continue_final_message", mode="before"
    )(classmethod(null_is_the_default))

    def ignored_fields(self) -> list[str]:
        return ignored_fields(self.model_extra or {})


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int]

    def ignored_fields(self) -> list[str]:
        return ignored_fields(self.model_extra or {})


async def tokenize(engine: Engine, body: TokenizeRequest) -> JSONResponse:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give `prompt` (a text) or `messages` (a chat), one of them")
    if body.prompt is not None and (
        body.tools or body.continue_final_message or body.chat_template_kwargs
    ):
        raise InvalidRequestError(
            "tools, continue_final_message and chat_template_kwargs are taken with `messages`, "
            "not with `prompt`"
        )
    if body.messages is not None:
        check_no_special_tokens(body.add_special_tokens)
        if not engine.tokenizer.has_chat_template:
            raise InvalidRequestError("the model has no chat template")
        ids = await chat_prompt_ids(engine, body)
    else:
        assert body.prompt is not None
        special = body.add_special_tokens is not False
        (ids,) = await completion_prompt_ids(engine, [body.prompt], None, special)
    pieces = None
    if body.return_token_strs:
        to_pieces = engine.tokenizer.hf_tokenizer.convert_ids_to_tokens
        pieces = await off_loop_if_long(ids, to_pieces, ids)
    result = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    return JSONResponse({**result, "token_strs": pieces})


async def detokenize(engine: Engine, body: DetokenizeRequest) -> dict[str, Any]:
    if not body.tokens:
        return {"prompt": ""}
    return {"prompt": await off_loop_if_long(body.tokens, _text_of, engine, body.tokens)}


_LOCAL_FIELDS = frozenset({"name_or_path", "is_local", "local_files_only"})
"""Fields of the tokenizer's configuration that describe this machine, not the tokenizer (so
does any `..._file`: a path, of this machine's or of the model author's)."""


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    """GET /tokenizer_info, as vLLM's (`--enable-tokenizer-info-endpoint`): the tokenizer's
    configuration as transformers read it (tokenizer_config.json's fields: its special tokens,
    `model_max_length`, `added_tokens_decoder`, ...), without this machine's paths, with its
    class and chat template. lm-evaluation-harness's remote tokenizer reads it."""
    hf = engine.tokenizer.hf_tokenizer
    folder = str(engine.tokenizer.folder)
    config = {
        key: _json_ready(value)
        for key, value in hf.init_kwargs.items()
        if not (
            key in _LOCAL_FIELDS
            or key.endswith("_file")
            or (isinstance(value, str) and folder in value)
        )
    }
    config["tokenizer_class"] = type(hf).__name__
    template = getattr(hf, "chat_template", None)
    if template:
        config["chat_template"] = template  # a chat_template.jinja file's too
    return config


def _json_ready(value: Any) -> Any:
    """`value` with transformers' AddedToken objects as their text."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if hasattr(value, "content"):  # an AddedToken
        return str(value.content)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _text_of(engine: Engine, ids: list[int]) -> str:
    engine.tokenize(ids)  # ids the model lacks: InvalidRequestError, as for a prompt
    return str(engine.tokenizer.decode(ids, skip_special_tokens=False))
