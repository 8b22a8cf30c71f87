"""The request bodies of the OpenAI-compatible API, and how each becomes medha's SamplingParams.

Field names and defaults are OpenAI's, with vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ...) and medha's own `deadline` (seconds to the first token, as
`Engine.stream` takes it). pydantic checks only the JSON's shape; SamplingParams checks the
values, so the HTTP API refuses exactly what the Python API refuses, with the same messages.
Unknown fields are kept and logged, not refused: OpenAI's clients send some medha has no use for
(`user`, `store`, `metadata`, ...), as vLLM does; but a known field that would change the output
and that medha does not do (`functions`, `chat_template`, ...) is refused, not silently dropped.
Tools are medha.server.tool_protocol's.
An explicit null takes the field's default, as OpenAI's API allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from medha.errors import InvalidRequestError
from medha.model.tokenizer import joined_text_parts
from medha.sampling import SamplingParams
from medha.server.tool_calls import ToolCalling
from medha.server.tool_parsers import ToolCallParser
from medha.server.tool_protocol import ToolChoice, ToolDefinition, tool_calling
from medha.structured_outputs import StructuredOutputsParams

MAX_CHOICES = 16
"""Most choices one HTTP request may ask for (prompts x n): each is an engine request."""


def null_is_the_default(cls: type[BaseModel], value: object, info: ValidationInfo) -> object:
    """A field's validator: JSON's null means the field's default (OpenAI's fields are
    nullable)."""
    if value is None and info.field_name is not None:
        return cls.model_fields[info.field_name].default
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    """A last chunk with no choices and the token counts of the whole request."""
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk of a choice has its counts so far too."""

    _defaults = field_validator("include_usage", "continuous_usage_stats", mode="before")(
        classmethod(null_is_the_default)
    )


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """None (OpenAI's schema is optional): any JSON value."""
    strict: bool | None = None

    _defaults = field_validator("name", mode="before")(classmethod(null_is_the_default))


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs `json_schema`")
        schema = {} if self.json_schema.schema_ is None else self.json_schema.schema_
        return StructuredOutputsParams(json=schema)  # type: ignore[arg-type]  # dicts are taken


UNSUPPORTED = {
    # field: the value that means "not used" (anything else is refused)
    "functions": None,
    "function_call": None,
    "chat_template": None,
    "use_beam_search": False,
    "prompt_embeds": None,
    "guided_whitespace_pattern": None,
}
"""vLLM's and OpenAI's fields that change the output in a way medha does not do."""

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
"""vLLM's former names of structured outputs (`guided_json`, ...), as its server still takes."""


def ignored_fields(extra: dict[str, Any]) -> list[str]:
    """Of a body's fields beyond its model's, those medha does not know (the server logs them);
    InvalidRequestError for one it knows and does not do (UNSUPPORTED)."""
    for name, unused in UNSUPPORTED.items():
        value = extra.get(name)
        if value is not None and value != unused and value not in ([], {}):
            raise InvalidRequestError(f"{name} is not supported by medha")
    return sorted(set(extra) - set(UNSUPPORTED) - set(GUIDED))


_SAMPLING_DEFAULTS: dict[str, Any] = {
    name: getattr(SamplingParams(), name)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
}
"""SamplingParams' own values of the fields a model's generation_config.json may set."""


class _SamplingFields(BaseModel):
    """What both endpoints share: OpenAI's sampling fields, vLLM's extras and medha's deadline."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    """The served model's name; None or "" (not OpenAI's; vLLM's) means the one this server
    serves."""
    n: int = 1
    best_of: int | None = None
    """vLLM's (older) field: only best_of = n, n samples all returned, is supported."""
    # The five sampling fields a model's generation_config.json may set: None (left out, or
    # null) is the model's value, else SamplingParams' (`sampling_params`).
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool | None = None
    """vLLM's: logprobs name each token `token_id:ID` instead of by its text (None: the
    server's default, `create_app(return_tokens_as_token_ids=...)`)."""
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    cache_salt: str | None = None
    """Only requests with the same salt share prefix-cache blocks (Engine.stream's)."""
    # medha's
    deadline: float | None = None
    """Seconds from arrival to the first token (Engine.stream's `deadline`); None: the
    engine's default for the prompt's length."""

    @property
    def wants_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def wants_usage_per_chunk(self) -> bool:
        """vLLM's `continuous_usage_stats`, which counts only with `include_usage`."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    _defaults = field_validator(
        "n",
        "stream",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        mode="before",
    )(classmethod(null_is_the_default))

    def ignored_fields(self) -> list[str]:
        """The fields sent that medha does not know (logged by the server); raises
        InvalidRequestError for a known one it does not do."""
        return ignored_fields(self.model_extra or {})

    def _guided(self) -> dict[str, Any] | None:
        extra = self.model_extra or {}
        given = {GUIDED[name]: extra[name] for name in GUIDED if extra.get(name) is not None}
        return given or None

    def check_choices(self, prompts: int) -> None:
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {self.n}")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (only best_of = n)")
        if self.n * prompts > MAX_CHOICES:
            raise InvalidRequestError(
                f"at most {MAX_CHOICES} choices per request (prompts x n), got {self.n * prompts}"
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream=true")

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        tool_schema: dict[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> SamplingParams:
        """medha's SamplingParams of this request (of its first choice: `start_choices` gives
        each other sample its seed); `tool_schema` constrains the output to a tool call;
        `defaults`: the model's sampling defaults (Engine.sampling_defaults), for the fields
        the request leaves out."""
        model = {**_SAMPLING_DEFAULTS, **(defaults or {})}
        given = {name: getattr(self, name) for name in _SAMPLING_DEFAULTS}
        chosen = {name: model[name] if value is None else value for name, value in given.items()}
        text = self.response_format is not None and self.response_format.type == "text"
        shapes = [None if text else self.response_format, self.structured_outputs, self._guided()]
        if sum(shape is not None for shape in [*shapes, tool_schema]) > 1:
            raise InvalidRequestError(
                "give one of response_format, structured_outputs, guided_* (vLLM's old names) "
                'and tool_choice "required" or a named function'
            )
        structured: StructuredOutputsParams | dict[str, Any] | None = self.structured_outputs
        if structured is None:  # an empty one is refused, as vLLM refuses it: not "none"
            structured = self._guided()
        if self.response_format is not None and not text:
            structured = self.response_format.structured_outputs()
        if tool_schema is not None:
            # Without free whitespace: a call is read by a program, to which it means nothing,
            # and a model could spend its whole max_tokens on it (a random one does).
            structured = StructuredOutputsParams(
                json=tool_schema,  # type: ignore[arg-type]  # dicts are taken
                disable_any_whitespace=True,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            **chosen,
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((self.logit_bias or {}).items()),  # type: ignore[arg-type]
            allowed_token_ids=(
                None if self.allowed_token_ids is None else tuple(self.allowed_token_ids)
            ),
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            bad_words=tuple(self.bad_words or ()),
            structured_outputs=structured,  # type: ignore[arg-type]  # a dict is coerced
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    """The prompt starts each choice's text, and its scored tokens the logprobs (medha.server.
    echo); with max_tokens 0, nothing else."""
    suffix: str | None = None
    add_special_tokens: bool = True
    """vLLM's: encode a text prompt with the tokenizer's special tokens (a BOS)."""

    _completion_defaults = field_validator("add_special_tokens", mode="before")(
        classmethod(null_is_the_default)
    )

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one choice (or n) each: OpenAI takes one or a list of them."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]  # type: ignore[list-item]  # one token-id prompt
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        return list(prompt)  # type: ignore[arg-type]  # several, text or token ids

    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes: the request's, and with `echo` and
        `logprobs` as many alternatives as the echoed prompt's table shows."""
        asked = self.prompt_logprobs
        if not self.echo or self.logprobs is None or (asked is not None and asked < 0):
            return asked  # a negative count: SamplingParams refuses it, as without echo
        return max(asked or 0, self.logprobs)

    def check_supported(self) -> None:
        if self.echo and self.max_tokens == 0 and self.min_tokens > 0:
            raise InvalidRequestError("min_tokens must be 0 with max_tokens 0 (the prompt alone)")
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice = None
    """None: "auto" with tools, else "none" (OpenAI's defaults)."""
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    """vLLM's; only false: the chat template writes the special tokens."""
    continue_final_message: bool = False
    """vLLM's: the model goes on with the last message (with add_generation_prompt false)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's: variables for the chat template (Qwen 3's `enable_thinking`)."""
    include_reasoning: bool = True
    """vLLM's: with a reasoning parser, the message has the model's thinking."""
    echo: bool = False
    """vLLM's: the content starts with the last message's, when that is the assistant's (a
    prefilled answer the model continues, `continue_final_message`)."""

    _chat_defaults = field_validator(
        "add_generation_prompt",
        "add_special_tokens",
        "parallel_tool_calls",
        "continue_final_message",
        "include_reasoning",
        "echo",
        mode="before",
    )(classmethod(null_is_the_default))

    def tool_calling(self, parser: ToolCallParser | None) -> ToolCalling | None:
        """How the output becomes tool calls (medha.server.tool_protocol); None: plain text."""
        return tool_calling(self.tools, self.tool_choice, self.parallel_tool_calls, parser)

    def output_limit(self) -> int | None:
        """max_completion_tokens (OpenAI's current name) or max_tokens; None: up to the
        context, as vLLM."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true")
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_supported(self) -> None:
        check_no_special_tokens(self.add_special_tokens)

    def echoed(self) -> str:
        """What `echo` starts each choice's content with: the last message's content if it
        is the assistant's, else nothing."""
        return self.final_assistant_text() if self.echo else ""

    def continues_final_message(self) -> bool:
        """Whether the prompt goes on with the last message: `continue_final_message`, or
        (over it, as vLLM takes it) chat_template_kwargs' (checked when it was rendered)."""
        given = (self.chat_template_kwargs or {}).get("continue_final_message")
        return given if isinstance(given, bool) else self.continue_final_message

    def final_assistant_text(self) -> str:
        """The last message's content if it is the assistant's (text parts joined by
        newlines, as the template got them), else "". The messages are checked already (the
        prompt was rendered)."""
        last = self.messages[-1]
        if last.get("role") != "assistant":
            return ""
        content = last.get("content")
        if isinstance(content, list):
            return joined_text_parts(content)
        return content if isinstance(content, str) else ""


def check_no_special_tokens(add_special_tokens: bool | None) -> None:
    """Chat messages are encoded without the tokenizer's special tokens (a BOS): the chat
    template writes its own, and the tokenizer's would be a second one."""
    if add_special_tokens:
        raise InvalidRequestError(
            "add_special_tokens is not supported with messages: the chat template writes the "
            "special tokens"
        )
