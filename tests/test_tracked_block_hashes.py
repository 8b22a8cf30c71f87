"""The engine's record of a request hashes the blocks its output fills as they fill, each
digest continuing its prompt's chain: the same digests a next turn's prompt gets."""

from __future__ import annotations

import random

from medha.actors.tracked import TrackedRequest
from medha.request import TokenEvent
from medha.sampling import SamplingParams
from medha.scheduler.prefix_cache import block_hashes
from tests.engine_support import tracked_request


def _request(prompt: list[int], block_size: int) -> TrackedRequest:
    return tracked_request(
        prompt,
        SamplingParams(max_tokens=100),
        hash_block_size=block_size,
        block_hashes=block_hashes(prompt, block_size) if block_size else (),
    )


def test_output_blocks_are_hashed_as_they_fill_continuing_the_prompts_chain() -> None:
    rng = random.Random(3)
    prompt = [rng.randrange(26) for _ in range(21)]  # one full block and 5 tokens
    output = [rng.randrange(26) for _ in range(45)]
    request = _request(prompt, 16)
    new: list[bytes] = []
    for count, token in enumerate(output, start=1):
        request.emit(TokenEvent("r", token, ""))
        digests = request.new_block_hashes()
        # A block is hashed on the token that fills it, not before and not again.
        assert len(digests) == int((len(prompt) + count) % 16 == 0)
        new.extend(digests)
    assert request.block_hashes == block_hashes([*prompt, *output], 16)
    assert tuple(new) == request.block_hashes[1:]


def test_a_prompt_shorter_than_a_block_still_caches_its_output() -> None:
    request = _request([1, 2, 3], 16)
    assert request.block_hashes == ()
    for token in range(13):
        request.emit(TokenEvent("r", token, ""))
    assert request.new_block_hashes() == block_hashes([1, 2, 3, *range(13)], 16)


def test_nothing_is_hashed_with_prefix_caching_off() -> None:
    request = _request([1] * 40, 0)
    for token in range(40):
        request.emit(TokenEvent("r", token, ""))
        assert request.new_block_hashes() == ()
    assert request.block_hashes == ()
