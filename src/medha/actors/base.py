"""A small actor: a mailbox (anyio memory stream), a run loop, request/reply, and failure that
reaches whoever waits.

An actor handles one message at a time, so its state needs no locks. `tell` sends and forgets;
`ask` sends and awaits the reply, which is the handler's return value or its exception. If the
actor dies (its handler raised on a `tell`, or its loop failed), every pending and later `ask`
raises ActorFailedError with the original error as the cause, instead of hanging. If it is
stopped (its loop cancelled: the engine is closing), they raise ActorStoppedError, an
EngineClosedError: stopping is not a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from medha.errors import EngineClosedError, EngineFailedError

Msg = TypeVar("Msg")


class ActorFailedError(EngineFailedError):
    """The actor an `ask` went to has died; `__cause__` is what killed it."""


class ActorStoppedError(EngineClosedError):
    """The actor an `ask` went to was stopped before it replied (the engine is closing)."""


@dataclass(eq=False)
class _Envelope(Generic[Msg]):
    message: Msg
    wants_reply: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Actor(Generic[Msg]):
    """Subclass and implement `handle`; run `run()` in a task group; talk with tell/ask."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._send: MemoryObjectSendStream[_Envelope[Msg]]
        self._receive: MemoryObjectReceiveStream[_Envelope[Msg]]
        self._send, self._receive = anyio.create_memory_object_stream[_Envelope[Msg]](math.inf)
        self._pending: set[_Envelope[Msg]] = set()
        self.failure: BaseException | None = None
        self.stopped = False

    async def handle(self, message: Msg) -> Any:
        raise NotImplementedError

    # -- sending ----------------------------------------------------------------------------

    def tell(self, message: Msg) -> None:
        """Queue `message`; never blocks (the mailbox is unbounded)."""
        self._check_alive()
        self._send.send_nowait(_Envelope(message, wants_reply=False))

    async def ask(self, message: Msg) -> Any:
        """Send `message` and wait for the handler's result (or its exception)."""
        self._check_alive()
        envelope = _Envelope(message, wants_reply=True)
        self._pending.add(envelope)
        self._send.send_nowait(envelope)
        try:
            await envelope.done.wait()
        finally:
            self._pending.discard(envelope)
        if envelope.error is not None:
            raise envelope.error
        return envelope.result

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Handle messages until the mailbox is closed or a `tell` handler fails."""
        try:
            async with self._receive:
                async for envelope in self._receive:
                    await self._dispatch(envelope)
        except anyio.get_cancelled_exc_class():
            self.stop()
            raise
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            self._resolve_pending()

    async def receive(self) -> Msg:
        """For actors with a custom loop: the next message (only `tell` messages expected)."""
        envelope = await self._receive.receive()
        return envelope.message

    def receive_nowait(self) -> Msg | None:
        """The next queued message, or None if there is none (or the mailbox is closed)."""
        try:
            return self._receive.receive_nowait().message
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    async def _dispatch(self, envelope: _Envelope[Msg]) -> None:
        try:
            result = await self.handle(envelope.message)
        except Exception as exc:
            if not envelope.wants_reply:
                raise
            envelope.resolve(error=exc)
        else:
            envelope.resolve(result)

    def close(self) -> None:
        """Stop accepting messages; the loop ends once the mailbox is drained."""
        self._send.close()

    def close_mailbox(self) -> None:
        """For actors with a custom loop, once it has ended: close both ends of the mailbox
        (`run` does it for the others), whose streams warn when collected open."""
        self._send.close()
        self._receive.close()

    def fail(self, error: BaseException) -> None:
        """Mark the actor dead: later tells and asks raise ActorFailedError."""
        if self.failure is None:
            self.failure = error
        self._send.close()
        self._resolve_pending()

    def stop(self) -> None:
        """Mark the actor stopped (its loop was cancelled): later tells and asks, and those
        still waiting, raise ActorStoppedError."""
        self.stopped = True
        self._send.close()
        self._resolve_pending()

    def _resolve_pending(self) -> None:
        for envelope in list(self._pending):
            if not envelope.done.is_set():
                error: BaseException
                if self.failure is not None:
                    error = ActorFailedError(f"actor {self.name} stopped before replying")
                    error.__cause__ = self.failure
                else:
                    error = ActorStoppedError(f"actor {self.name} stopped before replying")
                envelope.resolve(error=error)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise ActorFailedError(f"actor {self.name} has failed") from self.failure
        if self.stopped:
            raise ActorStoppedError(f"actor {self.name} has stopped")
