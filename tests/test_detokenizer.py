"""IncrementalDetokenizer: deltas never split a character, keep SentencePiece's spaces, add up
to the full decode, and cost a bounded amount of decoding per token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from medha.detokenizer import CONTEXT_TOKENS, MAX_HELD_TOKENS, IncrementalDetokenizer
from tests.detokenizer_support import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    TRAINING_TEXT,
    HFDecoder,
    byte_token,
)


def _stream(
    tokenizer: Tokenizer, ids: Sequence[int], prompt_ids: Sequence[int] = ()
) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(HFDecoder(tokenizer), prompt_ids)
    return [detokenizer.step(token_id) for token_id in ids], detokenizer.flush()


def test_multibyte_characters_split_across_tokens_are_emitted_whole() -> None:
    ids = BYTE_LEVEL.encode("日本語 😀🎉 café").ids
    deltas, rest = _stream(BYTE_LEVEL, ids)
    assert "".join(deltas) == "日本語 😀🎉 café"
    assert rest == ""
    assert all("\ufffd" not in delta for delta in deltas)
    # The tokenizer really does split characters: some single tokens decode to U+FFFD.
    assert any("\ufffd" in BYTE_LEVEL.decode([token_id]) for token_id in ids)


def test_text_before_an_unfinished_character_is_not_held_back() -> None:
    emoji_bytes = BYTE_LEVEL.encode("😀").ids
    assert len(emoji_bytes) > 1
    detokenizer = IncrementalDetokenizer(HFDecoder(BYTE_LEVEL))
    assert detokenizer.step(BYTE_LEVEL.encode("ok").ids[0]) != ""
    deltas = [detokenizer.step(token_id) for token_id in emoji_bytes]
    assert deltas[:-1] == [""] * (len(emoji_bytes) - 1)
    assert deltas[-1] == "😀"


def test_sentencepiece_leading_spaces_are_kept_between_tokens() -> None:
    vocab = SENTENCEPIECE.get_vocab()
    ids = [vocab["▁Hello"], vocab["▁world"], vocab["!"]]
    # Decoding token by token would lose the space: the decoder strips a leading one.
    assert SENTENCEPIECE.decode([vocab["▁world"]]) == "world"
    deltas, _ = _stream(SENTENCEPIECE, ids)
    assert deltas == ["Hello", " world", "!"]


def test_first_output_token_gets_its_space_from_the_prompt_context() -> None:
    vocab = SENTENCEPIECE.get_vocab()
    deltas, _ = _stream(SENTENCEPIECE, [vocab["▁world"]], prompt_ids=[vocab["▁Hello"]])
    assert deltas == [" world"]


def test_byte_fallback_pieces_are_emitted_once_the_character_is_complete() -> None:
    vocab = SENTENCEPIECE.get_vocab()
    ids = [vocab["▁Hello"]] + [vocab[f"<0x{b:02X}>"] for b in "本".encode()] + [vocab["!"]]
    deltas, _ = _stream(SENTENCEPIECE, ids)
    assert deltas == ["Hello", "", "", "本", "!"]


def test_skip_special_tokens_is_passed_to_the_decoder() -> None:
    vocab = SENTENCEPIECE.get_vocab()
    ids = [vocab["▁Hello"], vocab["</s>"]]
    kept = IncrementalDetokenizer(HFDecoder(SENTENCEPIECE), skip_special_tokens=False)
    skipped = IncrementalDetokenizer(HFDecoder(SENTENCEPIECE))
    assert "".join(kept.step(i) for i in ids) == "Hello</s>"
    assert "".join(skipped.step(i) for i in ids) == "Hello"


def test_work_per_token_is_bounded_however_long_the_output() -> None:
    text = " ".join(TRAINING_TEXT) * 4
    ids = BYTE_LEVEL.encode(text).ids
    decoder = HFDecoder(BYTE_LEVEL)
    detokenizer = IncrementalDetokenizer(decoder)
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert len(ids) > 1000
    assert "".join(deltas) == text
    assert max(decoder.decoded_lengths) <= 2 * CONTEXT_TOKENS + 8
    assert len(decoder.decoded_lengths) <= 2 * len(ids)


def test_a_long_run_of_invalid_bytes_is_emitted_instead_of_held_forever() -> None:
    # A lone UTF-8 continuation byte: invalid on its own and after itself.
    invalid = next(
        token_id
        for token_id in range(256)
        if BYTE_LEVEL.decode([token_id]) == "\ufffd"
        and BYTE_LEVEL.decode([token_id, token_id]) == "\ufffd\ufffd"
    )
    ids = [invalid] * (3 * MAX_HELD_TOKENS)
    decoder = HFDecoder(BYTE_LEVEL)
    detokenizer = IncrementalDetokenizer(decoder)
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert "".join(deltas) + detokenizer.flush() == BYTE_LEVEL.decode(ids)
    assert "".join(deltas[: 2 * MAX_HELD_TOKENS]) != ""
    assert max(decoder.decoded_lengths) <= 2 * CONTEXT_TOKENS + MAX_HELD_TOKENS


@pytest.mark.parametrize("invalid", range(MAX_HELD_TOKENS - 4, MAX_HELD_TOKENS + 2))
def test_a_character_completed_after_a_long_invalid_run_is_emitted(invalid: int) -> None:
    # Where the held run reaches MAX_HELD_TOKENS inside the emoji, the emoji's start must stay
    # held, not go out as U+FFFD with its completion then lost.
    ids = [byte_token(0x80)] * invalid + [byte_token(b) for b in "😀x".encode()]
    deltas, rest = _stream(BYTE_LEVEL, ids)
    assert "".join(deltas) + rest == BYTE_LEVEL.decode(ids)
    assert "".join(deltas).endswith("\ufffd😀x")


def test_tokens_without_text_inside_the_held_character_do_not_lose_it() -> None:
    # A decoder that cannot say which ids it skips: <eos> tokens between the emoji's bytes
    # have no bytes, so the character's start lies further back than the last tokens.
    eos = BYTE_LEVEL.token_to_id("<eos>")
    for invalid in range(MAX_HELD_TOKENS - 8, MAX_HELD_TOKENS + 2):
        for skipped in range(4):
            ids = [byte_token(0x80)] * invalid + [byte_token(0xF0)] + [eos] * skipped
            ids += [byte_token(b) for b in b"\x9f\x98\x80x"]
            deltas, rest = _stream(BYTE_LEVEL, ids)
            assert "".join(deltas) + rest == BYTE_LEVEL.decode(ids), (invalid, skipped)


class SpecialAwareDecoder(HFDecoder):
    """HFDecoder that names the ids a skipping decode removes, as medha's Tokenizer does."""

    @property
    def special_token_ids(self) -> frozenset[int]:
        added = self.tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)


@pytest.mark.parametrize("decoder_type", [HFDecoder, SpecialAwareDecoder])
@pytest.mark.parametrize("specials", [1, CONTEXT_TOKENS, 2 * CONTEXT_TOKENS + 3])
def test_a_word_after_a_run_of_skipped_tokens_keeps_its_space(
    decoder_type: type[HFDecoder], specials: int
) -> None:
    vocab = SENTENCEPIECE.get_vocab()
    hello, world, eos = vocab["▁Hello"], vocab["▁world"], vocab["</s>"]
    for words_before in range(2 * CONTEXT_TOKENS + 2):
        ids = [world] * words_before + [eos] * specials + [world, world]
        detokenizer = IncrementalDetokenizer(decoder_type(SENTENCEPIECE), [hello])
        text = "".join(detokenizer.step(token_id) for token_id in ids) + detokenizer.flush()
        assert text == " world" * (words_before + 2)


def test_skipped_tokens_stay_out_of_the_window() -> None:
    vocab = SENTENCEPIECE.get_vocab()
    decoder = SpecialAwareDecoder(SENTENCEPIECE)
    detokenizer = IncrementalDetokenizer(decoder, [vocab["▁Hello"]])
    deltas = [detokenizer.step(vocab["</s>"]) for _ in range(500)]
    assert deltas == [""] * 500 and not decoder.decoded_lengths[1:]
    assert detokenizer.step(vocab["▁world"]) == " world"


def test_flush_returns_an_unfinished_final_character_as_replacement_characters() -> None:
    ids = BYTE_LEVEL.encode("a😀").ids[:-1]
    deltas, rest = _stream(BYTE_LEVEL, ids)
    assert "".join(deltas) == "a"
    assert rest and set(rest) == {"\ufffd"}
    assert "".join(deltas) + rest == BYTE_LEVEL.decode(ids)


token_ids = st.integers(min_value=0, max_value=BYTE_LEVEL.get_vocab_size() - 1)
multilingual_text = st.text(
    alphabet=st.sampled_from(list("abc ,.é日本語😀🎉👍🏽ö\n")), min_size=0, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(st.lists(token_ids, max_size=60))
def test_deltas_add_up_to_the_full_decode_of_random_byte_level_ids(ids: list[int]) -> None:
    deltas, rest = _stream(BYTE_LEVEL, ids)
    assert "".join(deltas) + rest == BYTE_LEVEL.decode(ids)


def _sentencepiece_units() -> st.SearchStrategy[list[int]]:
    """A piece id, or the byte tokens spelling one whole character (as a model emits them).

    Not arbitrary byte tokens: byte fallback decodes a run of byte tokens together and turns ALL
    of it into U+FFFD when it is invalid, so "<0x00>" then "<0x80>" rewrites an already emitted
    "\x00"; no streaming detokenizer (vLLM's neither) can take text back.
    """
    vocab = SENTENCEPIECE.get_vocab()
    pieces = sorted(i for token, i in vocab.items() if not token.startswith("<"))
    spelled = st.characters(codec="utf-8", exclude_categories=("Cs",)).map(
        lambda char: [vocab[f"<0x{byte:02X}>"] for byte in char.encode()]
    )
    return st.one_of(st.sampled_from(pieces).map(lambda i: [i]), spelled)


@settings(max_examples=200, deadline=None)
@given(st.lists(_sentencepiece_units(), max_size=30))
def test_deltas_add_up_to_the_full_decode_of_random_sentencepiece_ids(
    units: list[list[int]],
) -> None:
    ids = [token_id for unit in units for token_id in unit]
    deltas, rest = _stream(SENTENCEPIECE, ids)
    assert "".join(deltas) + rest == SENTENCEPIECE.decode(ids)


@settings(max_examples=200, deadline=None)
@given(multilingual_text)
def test_deltas_of_real_text_never_contain_a_replacement_character(text: str) -> None:
    deltas, rest = _stream(BYTE_LEVEL, BYTE_LEVEL.encode(text).ids)
    assert "".join(deltas) == text
    assert rest == ""
    assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=200, deadline=None)
@given(st.lists(token_ids, min_size=1, max_size=20), st.lists(token_ids, max_size=40))
def test_after_a_prompt_deltas_add_up_to_the_text_the_output_appends(
    prompt: list[int], ids: list[int]
) -> None:
    prompt_text = BYTE_LEVEL.decode(prompt)
    full_text = BYTE_LEVEL.decode(prompt + ids)
    # Only meaningful where the prompt ends on a whole character.
    assume(not prompt_text.endswith("\ufffd") and full_text.startswith(prompt_text))
    deltas, rest = _stream(BYTE_LEVEL, ids, prompt_ids=prompt)
    assert "".join(deltas) + rest == full_text[len(prompt_text) :]


@pytest.mark.parametrize("text", ["", "a", "日本語"])
def test_flush_after_everything_was_emitted_is_empty(text: str) -> None:
    _, rest = _stream(BYTE_LEVEL, BYTE_LEVEL.encode(text).ids)
    assert rest == ""


def test_a_character_the_prompt_left_unfinished_is_emitted_whole_by_the_output() -> None:
    ids = BYTE_LEVEL.encode("Hi 😀 ok").ids
    cut = next(n for n in range(1, len(ids)) if BYTE_LEVEL.decode(ids[:n]).endswith("\ufffd"))
    deltas, rest = _stream(BYTE_LEVEL, ids[cut:], prompt_ids=ids[:cut])
    assert "".join(deltas) + rest == "😀 ok"
    # Bytes no output token completes come out as U+FFFD, before the output's own text.
    deltas, rest = _stream(BYTE_LEVEL, BYTE_LEVEL.encode("abc").ids, prompt_ids=ids[:cut])
    assert "".join(deltas) + rest == "\ufffdabc"


def test_text_is_never_cleaned_up_so_the_stream_loses_nothing(tmp_path: Path) -> None:
    """A tokenizer_config's clean_up_tokenization_spaces (transformers applies it to Unigram
    and WordPiece tokenizers, and in transformers 4 to BPE too) rewrites text already decoded
    (" ," to ","), which no stream can follow: medha's texts are the tokens' own, as vLLM's.
    A cleaning decode had made the stream lose characters ("Yes  we 'e here")."""
    import json

    from tokenizers import decoders, models, pre_tokenizers, trainers

    from medha.model.tokenizer import Tokenizer as MedhaTokenizer

    text = "Yes , we ' re here ."
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator([text, *TRAINING_TEXT], trainer)
    unigram.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = MedhaTokenizer.from_folder(tmp_path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.hf_tokenizer.decode(ids) != text  # transformers cleans this one up
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert "".join(deltas) + detokenizer.flush() == tokenizer.decode(ids) == text
