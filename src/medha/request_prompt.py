"""A request's prompt as the engine runs it: token ids checked against the vocabulary and the
context, the output's length limit, its text state and its prefix-caching digests.

Preparing a prompt costs time that grows with it: a 1M-token text takes ~2.3 s to tokenize
on a 2-core CPU, and ~0.15 s more to check, digest and hand to the detokenizer. On the event
loop that time would stall every stream, since the scheduler actor runs there too. So a long
prompt is prepared on a worker thread, when its stream's iteration starts; a short one inline,
so that `Engine.stream()` raises its errors at once.

The worker is one thread for the process, at a lower CPU priority (TOKENIZER_NICE), and the
checks that run there go through C code a chunk at a time (medha.request_input): a thread that
runs Python bytecode for long hands the GIL back only every 5 ms, which would slow the event
loop and the model thread at every step.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from medha.errors import InvalidRequestError
from medha.log import get_logger
from medha.output_text import OutputText
from medha.request_input import prompt_token_ids
from medha.request_limits import output_limit
from medha.sampling import SamplingParams
from medha.scheduler import Scheduler
from medha.scheduler.prefix_cache import block_hashes

if TYPE_CHECKING:
    from medha.actors.tracked import TrackedRequest

T = TypeVar("T")
_log = get_logger(__name__)

LONG_PROMPT = 16_384
"""Characters of a text, or ids of a token-id prompt, above which it is prepared off the
event loop (a text that long takes ~20 ms to tokenize)."""


def is_long(prompt: object) -> bool:
    """Whether `prompt` is prepared off the event loop."""
    if isinstance(prompt, str | list | tuple) or callable(getattr(prompt, "tolist", None)):
        try:
            return len(prompt) > LONG_PROMPT  # type: ignore[arg-type]
        except TypeError:  # a 0-d array: refused inline
            return False
    return False


def snapshot(prompt: object) -> object:
    """A long prompt as it is now, for preparing later: token ids copied, as a short prompt's
    are taken at once (the caller may reuse its list or array); a text as it is."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple):
        return list(prompt)
    return prompt.tolist()  # type: ignore[attr-defined]  # is_long(prompt): it has one


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    max_new_tokens: int
    """params.max_tokens, or what the context leaves where that is None."""
    output: OutputText
    block_hashes: tuple[bytes, ...]
    """Digests of the prompt's full blocks; () with prefix caching off."""


@dataclass(frozen=True)
class PromptPreparer:
    """Prepares the prompts of one engine. Only reads what it holds, so it may run on any
    thread: the scheduler's limits it checks are fixed when the engine starts."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    scheduler: Scheduler
    hash_block_size: int
    """Tokens per prefix-caching block; 0: prefix caching is off."""

    def placeholder(self, prompt: object, params: SamplingParams) -> PreparedPrompt:
        """What stands in for a long prompt's parts until they are prepared. A token-id
        prompt's length is known without its tokens, so whether it fits is checked now
        (PromptTooLongError, RequestTooLargeError): only a text's wait for its tokens."""
        if not isinstance(prompt, str):
            length = len(prompt)  # type: ignore[arg-type]  # is_long(prompt): it has one
            keep = params.prompt_keep(self.max_model_len)
            output_limit(
                length if keep is None else min(length, keep),
                params,
                self.max_model_len,
                self.scheduler,
            )
        # Never read: the request is submitted only once it has its prepared parts.
        return PreparedPrompt([], 0, OutputText(self.tokenizer, [], params, (), 1), ())

    def output_limit(self, prompt_tokens: object, params: SamplingParams) -> int:
        """Engine.output_limit: the tokens a request of `prompt_tokens` may generate."""
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int):
            raise InvalidRequestError(f"prompt_tokens must be an int, got {prompt_tokens!r}")
        if prompt_tokens < 1:
            raise InvalidRequestError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        keep = params.prompt_keep(self.max_model_len)  # what stream() cuts the prompt to
        runs = prompt_tokens if keep is None else min(prompt_tokens, keep)
        return output_limit(runs, params, self.max_model_len, self.scheduler)

    def prepare(
        self, prompt: object, params: SamplingParams, hash_root: bytes = b""
    ) -> PreparedPrompt:
        """Typed errors (medha.errors) for a prompt that cannot run: empty, not a prompt,
        ids outside the vocabulary, too long for the context or the KV cache. `hash_root`:
        what its block digests chain from (TrackedRequest.hash_root)."""
        ids = prompt_token_ids(
            prompt, self.tokenizer, self.vocab_size, params.prompt_keep(self.max_model_len)
        )
        max_new_tokens = output_limit(len(ids), params, self.max_model_len, self.scheduler)
        output = OutputText(
            self.tokenizer, ids, params, self.tokenizer.eos_token_ids, max_new_tokens
        )
        size = self.hash_block_size
        digests = block_hashes(ids, size, hash_root) if size else ()
        return PreparedPrompt(ids, max_new_tokens, output, digests)


TOKENIZER_NICE = 10
"""How much lower the tokenizer thread's CPU priority is than the process's (Linux, where
each thread has its own nice value). On a machine whose cores the model keeps busy (a CPU
engine), tokenizing a long prompt at the same priority slows every step while it lasts: on 2
cores, a 1M-token document made the other streams' largest gap between two tokens 4-5x usual
(benchmarks/long_prompt_stall.py). Lower, it takes the CPU the model leaves: the long request
waits for its tokens instead of every other request, as LARS has it wait for its prefill. Where
cores are free (a GPU engine), it changes nothing."""


async def prepare_off_loop(request: TrackedRequest, preparer: PromptPreparer) -> None:
    """Give `request` the parts of its long prompt, prepared on the tokenizer thread. Returns
    without them if `request.stop_preparing()` is called meanwhile (an abort, the engine
    stopping): a prompt still queued for the thread is then never tokenized."""
    with anyio.CancelScope() as scope:
        request.stop_preparing = scope.cancel
        try:
            prompt = request.unprepared_prompt
            prepared = await run_off_loop(
                preparer.prepare, prompt, request.params, request.hash_root
            )
        finally:
            request.stop_preparing = None
        request.take_prompt(prepared)


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def run_off_loop(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` (tokenizer work) on the process's tokenizer thread, one call at a time:
    long tokenizations queue behind each other rather than take the model's CPU together. The
    tokenizers library releases the GIL while it encodes, so the event loop runs on meanwhile.
    A cancelled caller returns at once; its call, if it has started, runs to its end (a
    tokenizer cannot be interrupted), its result dropped."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="medha-tokenizer", initializer=_lower_priority
            )
        executor = _executor
    return await asyncio.wrap_future(executor.submit(fn, *args))


def _forget_executor() -> None:
    """In a forked child, which has only the thread that forked: the parent's tokenizer thread
    is not there to run anything."""
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_executor)


def _lower_priority() -> None:
    """The tokenizer thread's set-up. An initializer that raises would leave the executor
    broken, every call refused: a thread at the process's priority is better than none."""
    if sys.platform != "linux":
        return  # elsewhere PRIO_PROCESS names a process, not a thread
    try:
        _start_tokenizers_pool()
        thread = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + TOKENIZER_NICE))
    except Exception as exc:
        _log.warning("tokenizer thread left at the process's priority", error=repr(exc))


def _start_tokenizers_pool() -> None:
    """Start the tokenizers library's pool of worker threads now, if nothing has yet: a new
    thread takes the nice value of the thread that starts it, so a pool started from the
    tokenizer thread would slow every batch encode of the process."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).encode_batch(["a", "a"])
