"""`truncation: "auto"` on /v1/responses: a conversation too long for the context loses its
oldest turns until it fits, as OpenAI's drops input items from the beginning of the
conversation.

A turn starts at a user message and runs to the next one. Whole turns go, so a function call
never loses its output (or an output its call), and what the chat template sees still starts
with a user message. What comes before the first user message (system and developer messages,
as `instructions`) is kept, and so is the last turn: the one the response answers. When even
that does not fit, the request is refused as without truncation, for the last turn alone.

The fewest turns go. The whole conversation is tried first (it fits as a rule, and costs one
encoding, as without truncation); then the count is found by bisection, each try rendering and
encoding the rest of the conversation once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Items = list[dict[str, Any]]


def turn_starts(items: Items) -> list[int]:
    """Where each turn of the input starts: the indices of its user messages."""
    return [
        index
        for index, item in enumerate(items)
        if item.get("type", "message") == "message" and item.get("role") == "user"
    ]


def without_turns(items: Items, starts: list[int], dropped: int) -> Items:
    """`items` without their first `dropped` turns (`starts`: turn_starts(items))."""
    if dropped == 0:
        return items
    return items[: starts[0]] + items[starts[dropped] :]


async def fewest_dropped(turns: int, fits: Callable[[int], Awaitable[bool]]) -> int:
    """The fewest turns to drop, of `turns`, for `fits(dropped)` to hold (it holds for every
    count above one it holds for: dropping more shortens the prompt); every turn but the last
    when even that does not fit."""
    if await fits(0) or turns <= 1:
        return 0
    low, high = 1, turns - 1
    if not await fits(high):
        return high
    while low < high:  # fits(high) holds, fits(low - 1) does not
        middle = (low + high) // 2
        if await fits(middle):
            high = middle
        else:
            low = middle + 1
    return high
