"""The checkpoint tokenizer: round trips, special tokens, chat templates, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medha.errors import InvalidRequestError, MedhaError, ModelLoadError
from medha.model.tokenizer import (
    BOS_TOKEN,
    TINY_CHAT_TEMPLATE,
    Tokenizer,
    write_tiny_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is your name?"},
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder, vocab_size=400)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_folder, config_eos_token_ids=(3, 1))


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_decode_inverts_encode_for_any_unicode_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_encode_prepends_bos_only_when_special_tokens_are_requested(tokenizer: Tokenizer) -> None:
    with_bos = tokenizer.encode("The quick brown fox.")
    plain = tokenizer.encode("The quick brown fox.", add_special_tokens=False)
    assert with_bos == [tokenizer.bos_token_id, *plain]
    assert tokenizer.decode(with_bos) == "The quick brown fox."


def test_trained_merges_make_common_words_single_tokens(tokenizer: Tokenizer) -> None:
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1
    assert tokenizer.vocab_size == 400


def test_chat_template_renders_turns_and_the_generation_prompt(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template(CHAT)
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        f"{BOS_TOKEN}<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt
    assert ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == tokenizer.decode(ids, skip_special_tokens=False)


def test_eos_ids_are_the_union_of_config_and_tokenizer_without_duplicates(
    tokenizer: Tokenizer,
) -> None:
    assert tokenizer.eos_token_ids == (3, 1)
    assert tokenizer.has_chat_template


def test_chat_template_may_live_in_a_jinja_file(tiny_folder: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "tok"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    from_jinja = Tokenizer.from_folder(folder)
    reference = Tokenizer.from_folder(tiny_folder)
    assert from_jinja.apply_chat_template(CHAT) == reference.apply_chat_template(CHAT)


def test_missing_chat_template_raises_a_medha_error_naming_the_config(
    tiny_folder: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "tok"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_folder(folder)
    assert not tokenizer.has_chat_template
    with pytest.raises(ModelLoadError, match="no chat template") as caught:
        tokenizer.apply_chat_template(CHAT)
    assert isinstance(caught.value, MedhaError)
    assert caught.value.path.endswith("tokenizer_config.json")


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], ["text"]])
def test_malformed_messages_are_an_invalid_request(tokenizer: Tokenizer, messages: object) -> None:
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize("absent", [{"content": None}, {}])
def test_a_message_without_content_reaches_the_template_as_an_empty_string(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, absent: dict[str, None]
) -> None:
    # A tool-calling turn has content null. SmolLM2's template joins the content to strings,
    # which None would break; vLLM passes "" instead, whether content is null or missing.
    joining = "{% for m in messages %}{{ m.role + ': ' + m.content + '|' }}{% endfor %}"
    monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", joining)
    call = {"function": {"name": "f", "arguments": "{}"}}
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", **absent, "tool_calls": [call]},
    ]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    assert text == "user: Hi|assistant: |"
    assert chat[1].get("content") is None  # the caller's messages are left as they were


def test_tiny_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path / "a", vocab_size=350)
    write_tiny_tokenizer(tmp_path / "b", vocab_size=350)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tiny_tokenizer_needs_room_for_every_byte(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        write_tiny_tokenizer(tmp_path, vocab_size=100)


def test_a_corrupt_tokenizer_config_raises_model_load_error_naming_it(
    tiny_folder: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "tok"))
    (folder / "tokenizer_config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_folder(folder)


ANSWER = [*CHAT, {"role": "assistant", "content": "My name is"}]


def test_continue_final_message_leaves_the_last_message_open(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        ANSWER, add_generation_prompt=False, tokenize=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nMy name is")
    assert text == tokenizer.hf_tokenizer.apply_chat_template(
        ANSWER, tokenize=False, continue_final_message=True
    )
    ids = tokenizer.apply_chat_template(ANSWER, False, continue_final_message=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    with pytest.raises(InvalidRequestError, match="set one of them"):
        tokenizer.apply_chat_template(ANSWER, continue_final_message=True)


def test_a_template_that_drops_the_message_to_continue_is_an_invalid_request(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = "{% for m in messages[:-1] %}{{ m.content }}{% endfor %}"
    monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", template)
    with pytest.raises(InvalidRequestError, match="final message"):
        tokenizer.apply_chat_template(ANSWER, False, continue_final_message=True)


THINKING = (
    "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)


def test_chat_template_kwargs_are_the_templates_variables(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", THINKING)

    def render(**kwargs: object) -> str:
        return tokenizer.apply_chat_template(CHAT, tokenize=False, chat_template_kwargs=kwargs)

    assert render(enable_thinking=False) == "/no_think Be brief.What is your name?"
    assert render(enable_thinking=True) == render() == "Be brief.What is your name?"
    assert render(unused=1) == render()  # a variable the template does not use: nothing
    for reserved in ("tokenize", "chat_template", "messages", "tools", "conversation"):
        with pytest.raises(InvalidRequestError, match=f"may not set {reserved}"):
            render(**{reserved: None})
    # As vLLM merges them: the arguments of what is rendered, not of how.
    monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", TINY_CHAT_TEMPLATE)
    assert render(add_generation_prompt=False) == tokenizer.apply_chat_template(
        CHAT, False, tokenize=False
    )
    continued = tokenizer.apply_chat_template(
        ANSWER,
        tokenize=False,
        chat_template_kwargs={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert continued.endswith("My name is")
    monkeypatch.setattr(tokenizer.hf_tokenizer, "chat_template", "{{ documents[0].text }}")
    assert render(documents=[{"title": "A", "text": "Cited."}]) == "Cited."
    for wrong in ({"add_generation_prompt": "no"}, {"documents": "Cited."}):
        with pytest.raises(InvalidRequestError, match="chat_template_kwargs' "):
            render(**wrong)
    for not_a_dict in (["enable_thinking"], {1: True}):
        with pytest.raises(InvalidRequestError, match="must be a dict"):
            tokenizer.apply_chat_template(CHAT, chat_template_kwargs=not_a_dict)  # type: ignore[arg-type]
