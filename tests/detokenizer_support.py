"""Tokenizers for detokenizer tests, built offline: a byte-level BPE trained on multilingual
text with emoji (characters split across tokens) and a Llama-2 style SentencePiece with byte
fallback (leading-space stripping), plus the decode protocol over them."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TRAINING_TEXT = [
    "Héllo wörld, café crème brûlée, naïve résumé. The quick brown fox jumps over the lazy dog.",
    "日本語のテキストです。東京は日本の首都です。中文也可以。한국어도 있어요.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 rocket 🚀🔥 ✓ ∑ π ≈ 3.14 — «quotes» “smart”",
] * 3


class HFDecoder:
    """The decode protocol over a `tokenizers.Tokenizer`, counting the work it is asked for."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return tokenizer


def _sentencepiece_with_byte_fallback() -> Tokenizer:
    """Llama-2 style: "▁" marks spaces, the decoder strips the first one, unknown characters
    are spelled as <0xNN> byte tokens (each invalid byte decodes to one U+FFFD)."""
    vocab = {"<unk>": 0, "</s>": 1}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", "▁Hello", "▁world", "é", "日", "!"]:
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(["</s>"])
    return tokenizer


BYTE_LEVEL = _byte_level_bpe()
SENTENCEPIECE = _sentencepiece_with_byte_fallback()


def byte_token(byte: int) -> int:
    """BYTE_LEVEL's id of the token spelling the one byte `byte` (GPT-2's byte alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    unprintable = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + unprintable.index(byte))
    token_id = BYTE_LEVEL.token_to_id(char)
    assert token_id is not None
    return token_id
