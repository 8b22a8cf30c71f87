"""What a request's output constraints become for one engine's tokenizer: its bad words as token
ids, its structured output as a grammar matcher. Both are worked out when the request is
submitted (a bad one is refused before it is queued) and cached by their text: a filter list
or a tool's JSON schema tends to come with every request, and encoding or compiling it each
time would hold up the event loop.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from medha.sampling import SamplingParams, bad_words_token_ids

if TYPE_CHECKING:
    from medha.grammar import GrammarCompiler, GrammarMatcher
    from medha.model.tokenizer import Tokenizer

_MAX_CACHED_WORD_LISTS = 64


class RequestConstraints:
    """Per engine: turns SamplingParams' bad_words and structured_outputs into what the
    scheduler actor and the sampler use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._bad_words: dict[tuple[str, ...], tuple[tuple[int, ...], ...]] = {}
        self._grammars: GrammarCompiler | None = None

    def bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """SamplingParams.bad_words as the token sequences the sampler bans."""
        encoded = self._bad_words.get(words)
        if encoded is None:
            encode = partial(self._tokenizer.encode, add_special_tokens=False)
            encoded = bad_words_token_ids(words, encode, self._vocab_size)
            if len(self._bad_words) >= _MAX_CACHED_WORD_LISTS:
                self._bad_words.clear()
            self._bad_words[words] = encoded
        return encoded

    def grammar(self, params: SamplingParams) -> GrammarMatcher | None:
        """A matcher at the start of params.structured_outputs (None without one).
        InvalidSamplingParamsError if it does not compile."""
        if params.structured_outputs is None:
            return None
        # ignore_eos: the output goes on past where the model would end it, within the grammar,
        # until the grammar ends (eos is then all that may follow, and the request is done).
        banned = tuple(self._tokenizer.eos_token_ids) if params.ignore_eos else ()
        return self._compiler().matcher(params.structured_outputs, banned)

    def _compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            # Imported here: an engine that never sees a structured output never loads
            # llguidance.
            from medha.grammar import GrammarCompiler

            self._grammars = GrammarCompiler(self._tokenizer, self._vocab_size)
        return self._grammars
