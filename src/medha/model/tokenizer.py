"""The tokenizer of a checkpoint folder, and a tiny one trained offline for test models.

`Tokenizer` wraps the folder's Hugging Face fast tokenizer so that encoding, decoding and chat
templates behave exactly as in transformers (the reference our exactness tests compare against).
`write_tiny_tokenizer` trains a small byte-level BPE on built-in English text: deterministic, no
network, and real enough (merges, special tokens, a chat template) to exercise every code path.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from medha.errors import InvalidRequestError, ModelLoadError
from medha.model.chat_history import calls_as_objects
from medha.request_input import check_unicode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its chat template and end-of-sequence ids."""

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        *,
        folder: Path,
        config_eos_token_ids: Sequence[int] = (),
        config_bos_token_id: int | None = None,
    ) -> None:
        self._hf = hf_tokenizer
        self.folder = folder
        tokenizer_eos = hf_tokenizer.eos_token_id
        # Instruct models end a turn with a token the tokenizer does not call "eos" (Llama-3's
        # <|eot_id|>), and config.json lists it: a generation must stop on either.
        eos = [*config_eos_token_ids, *([tokenizer_eos] if tokenizer_eos is not None else [])]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(e) for e in eos))
        bos = hf_tokenizer.bos_token_id
        self.bos_token_id: int | None = int(bos) if bos is not None else config_bos_token_id

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        *,
        config_eos_token_ids: Sequence[int] = (),
        config_bos_token_id: int | None = None,
    ) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`) from an HF checkpoint folder."""
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ModelLoadError(tokenizer_file, "missing (medha needs a fast tokenizer.json)")
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if (folder / name).is_file():
                _read_json(folder / name)  # a clear error naming the file, before transformers
        # transformers is imported here, not at module level: importing it takes seconds.
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            # The folder, not tokenizer.json: transformers also reads config.json and
            # tokenizer_config.json here, and its message names the field it refused.
            raise ModelLoadError(folder, f"transformers cannot load the tokenizer: {exc}") from exc
        return cls(
            hf_tokenizer,
            folder=folder,
            config_eos_token_ids=config_eos_token_ids,
            config_bos_token_id=config_bos_token_id,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added special tokens included."""
        return len(self._hf)

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        """The transformers tokenizer underneath (for libraries that take one)."""
        return self._hf

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """The ids `decode(..., skip_special_tokens=True)` leaves out: the added tokens marked
        special (what the tokenizers library skips), for medha.detokenizer."""
        return frozenset(
            int(token_id)
            for token_id, token in self._hf.added_tokens_decoder.items()
            if token.special
        )

    def is_special(self, text: str) -> bool:
        """Whether `text` is one special token: output text leaves it out (a format's marker
        that is one would never be seen there)."""
        ids = self.encode(text, add_special_tokens=False)
        return len(ids) == 1 and ids[0] in self.special_token_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The tokens' text, never "cleaned": HF's clean_up_tokenization_spaces (which
        transformers applies where a tokenizer_config sets it: to WordPiece and Unigram
        tokenizers, and in transformers 4 to BPE too) rewrites text already decoded (" ." to
        "."), which no stream can follow. vLLM's output text is not cleaned either."""
        text = self._hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return str(text)

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: Literal[True] = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: Literal[False],
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int] | str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int] | str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) and tokenize the result;
        with `tokenize=False` (as in transformers) the rendered text. Give the engine the ids:
        encoding the text again adds the tokenizer's special tokens (a second BOS). `tools`
        (OpenAI's function definitions) go to the template, which shows them to the model in
        its format (a template that does not use them leaves them out).

        As in transformers and vLLM: `continue_final_message` leaves the last message open, for
        the model to go on writing it (a prefilled answer; not with add_generation_prompt), and
        `chat_template_kwargs` are variables for the template (Qwen 3's `enable_thinking`);
        one the template does not use changes nothing."""
        if not self.has_chat_template:
            raise ModelLoadError(
                self.folder / TOKENIZER_CONFIG_FILE,
                "the tokenizer has no chat template; pass a plain prompt instead of messages",
            )
        messages = calls_as_objects(_text_content(messages))
        variables = _template_variables(chat_template_kwargs)
        # As in vLLM, chat_template_kwargs may also set these, over the arguments.
        add_generation_prompt = _flag(variables, "add_generation_prompt", add_generation_prompt)
        continue_final_message = _flag(variables, "continue_final_message", continue_final_message)
        documents = _documents(variables.pop("documents", None))
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message goes on with the last message; add_generation_prompt "
                "starts a new one: set one of them"
            )
        from jinja2 import TemplateError

        try:
            rendered = self._hf.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                tools=_tool_list(tools),
                continue_final_message=continue_final_message,
                documents=documents,
                **variables,
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        except (TypeError, ValueError) as exc:
            # TypeError: a template doing arithmetic on a value of another type; ValueError:
            # transformers' own refusals (a final message to continue that the template drops).
            raise InvalidRequestError(f"the chat template cannot render the chat: {exc}") from exc
        except RecursionError as exc:  # values nested deeper than the template can write
            raise InvalidRequestError("the messages are nested too deeply") from exc
        text = cast("str", rendered)
        # Values the checks above do not reach (a call's decoded arguments, the tools) may hold
        # a lone surrogate (JSON's "\ud800"), which no tokenizer encodes.
        check_unicode(text, "the rendered chat")
        if not tokenize:
            return text
        # What transformers does with tokenize=True: the template writes the special tokens.
        return self.encode(text, add_special_tokens=False)


_SETTABLE = frozenset({"add_generation_prompt", "continue_final_message", "documents"})
"""Parameters of transformers' apply_chat_template that chat_template_kwargs may set (vLLM's
merge lets it): what the chat's template is given, not how it renders."""


def _template_variables(kwargs: object) -> dict[str, Any]:
    """`chat_template_kwargs` checked: variables for the template, none of which may be a
    parameter of transformers' apply_chat_template (`tokenize`, `chat_template`, `tools`: that
    would change what is rendered, and how), but for those of _SETTABLE, or the messages."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise InvalidRequestError("chat_template_kwargs must be a dict of named values")
    from transformers import PreTrainedTokenizerBase

    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    refused = sorted(
        key for key in kwargs if key == "messages" or (key in parameters and key not in _SETTABLE)
    )
    if refused:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(refused)}: the request's own fields "
            "(messages, tools, ...) set what they can"
        )
    return dict(kwargs)


def _flag(variables: dict[str, Any], name: str, default: bool) -> bool:
    """The bool chat_template_kwargs sets for `name` (taken out of them), else `default`."""
    value = variables.pop(name, default)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"chat_template_kwargs' {name} must be true or false")
    return value


def _documents(documents: object) -> list[dict[str, Any]] | None:
    """chat_template_kwargs' `documents` (a RAG template's: Command R's, Granite's), checked."""
    if documents is None:
        return None
    if not isinstance(documents, list) or not all(isinstance(d, Mapping) for d in documents):
        raise InvalidRequestError("chat_template_kwargs' documents must be a list of dicts")
    return [dict(document) for document in documents]


def _tool_list(tools: object) -> list[Any] | None:
    """`tools` checked: a list of function definitions (dicts) or None."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes | Mapping):
        raise InvalidRequestError("tools must be a list of function definitions (dicts)")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f"tools[{index}] must be a dict, got {type(tool).__name__}")
    return [dict(tool) for tool in tools]


def joined_text_parts(parts: list[Mapping[str, Any]]) -> str:
    """OpenAI's text content parts as one string, as a chat template that takes a string
    gets them (by newlines, as vLLM joins them)."""
    return "\n".join(str(part.get("text", "")) for part in parts)


def _text_content(messages: object) -> list[dict[str, Any]]:
    """`messages` checked, with OpenAI's content parts ([{"type": "text", "text": ...}]) joined
    into one string (by newlines, as vLLM does for templates that take a string): a template
    would otherwise render the list's Python repr. No content is "" (as in vLLM)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} dicts")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{index}] must be a dict with a string 'role'")
        content = message.get("content")
        if content is None:
            # An assistant message that only calls tools has content null (or none): as in
            # vLLM, the template gets "", which templates that join strings (SmolLM2's) take.
            message = {**message, "content": ""}
        elif isinstance(content, list):
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"):
                    raise InvalidRequestError(
                        f"messages[{index}]: only text content parts are supported, got {part!r}"
                    )
            message = {**message, "content": joined_text_parts(content)}
        for key, value in message.items():  # the template renders them all
            if isinstance(value, str):
                check_unicode(value, f"messages[{index}]'s {key}")
        result.append(dict(message))
    return result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc


# --- a tiny tokenizer trained offline, for test models -------------------------------------------

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"
TINY_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN)

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAINING_TEXT = """\
Once upon a time, in a small village at the edge of a quiet forest, there lived an old clockmaker.
Every morning he opened his shop, wound the clocks on the wall, and listened to them tick together.
Children came by after school to ask how the gears fit inside, and he would show them patiently.
"A clock is a promise," he said. "It tells you that the next second will come, and then the next."
The weather changed with the seasons: rain in spring, long bright days in summer, wind in autumn,
and snow in winter that covered the roofs and the roads until the whole valley was white and still.
Scientists measure the speed of light, the weight of atoms and the distance to the stars.
Computers read numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2048 very quickly.
What is your name? Where do you live? How can I help you today? Thank you very much!
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm window sill.
A good question deserves a clear answer, and a clear answer deserves a short sentence.
She wrote a letter to her friend, folded it twice, and walked to the post office before noon.
"""


@dataclass(frozen=True)
class TinyTokenizerIds:
    """The special token ids of a tokenizer written by `write_tiny_tokenizer`."""

    bos_token_id: int
    eos_token_id: int
    turn_end_token_id: int
    vocab_size: int


def write_tiny_tokenizer(folder: Path, vocab_size: int = 512) -> TinyTokenizerIds:
    """Train a byte-level BPE of at most `vocab_size` ids and write it into `folder`.

    Deterministic: the same `vocab_size` always gives byte-identical files.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(TINY_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer "
            f"(needs at least {len(byte_alphabet) + len(TINY_SPECIAL_TOKENS)})"
        )
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    raw.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True), trainer)
    bos_id = _special_id(raw, BOS_TOKEN)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    folder.mkdir(parents=True, exist_ok=True)
    raw.save(str(folder / TOKENIZER_FILE))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return TinyTokenizerIds(
        bos_token_id=bos_id,
        eos_token_id=_special_id(raw, EOS_TOKEN),
        turn_end_token_id=_special_id(raw, TURN_END_TOKEN),
        vocab_size=raw.get_vocab_size(),
    )


def _special_id(raw: Any, token: str) -> int:
    token_id = raw.token_to_id(token)
    if token_id is None:  # the trainer always adds special tokens; this guards the invariant
        raise RuntimeError(f"trained tokenizer lacks special token {token}")
    return int(token_id)
