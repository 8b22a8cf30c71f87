"""An engine belongs to the asyncio event loop it was started on: its actors are tasks there,
and replies from its threads go there. From another loop a call would wait for a wake-up that
never comes, so it is refused with a typed error instead."""

from __future__ import annotations

import asyncio

from medha.errors import WrongEventLoopError


def starting_loop() -> asyncio.AbstractEventLoop:
    """The loop an engine starts on: the running asyncio loop."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio, or no loop at all
        raise WrongEventLoopError(
            "medha.Engine runs on asyncio (anyio's asyncio backend, asyncio.run, uvloop); "
            "no asyncio event loop is running here"
        ) from None


def check_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Refuse a call from anywhere but `loop` (None: the engine has not started)."""
    if loop is None:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        raise WrongEventLoopError(
            "no event loop is running here: call the Engine from a coroutine on the loop it "
            "was started on (from synchronous code, use medha.LLM)"
        ) from None
    if running is not loop:
        raise WrongEventLoopError(
            "this Engine was started on another event loop; use it from that loop (from "
            "another thread: asyncio.run_coroutine_threadsafe(..., loop)), or use medha.LLM"
        )
