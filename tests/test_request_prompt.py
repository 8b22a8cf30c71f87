"""A prompt's checks, a chunk of ids at a time (medha.request_input), and the tokenizer thread
long prompts are prepared on (medha.request_prompt.run_off_loop)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import anyio
import numpy as np
import pytest

from medha import request_prompt
from medha.errors import InvalidRequestError
from medha.request_input import prompt_token_ids
from medha.request_prompt import TOKENIZER_NICE, run_off_loop

pytestmark = pytest.mark.anyio

VOCAB = 1000
LONG = 3 * 65_536 + 17  # ids over several of the checks' chunks


class NoText:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise AssertionError("a token-id prompt is not encoded")


class Ids:
    """Encodes every text to `ids`."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.ids)


def _ids() -> list[int]:
    return [i % VOCAB for i in range(LONG)]


@pytest.mark.parametrize(
    ("where", "bad", "error"),
    [
        (0, VOCAB, "token id 1000 is outside"),
        (LONG - 1, VOCAB, "token id 1000 is outside"),  # in the last, partial chunk
        (65_536, -1, "token id -1 is outside"),  # the second chunk's first
        (2 * 65_536 + 5, True, "must hold ints, found bool"),
        (70_000, 3.0, "must hold ints, found float"),
        (70_000, None, "must hold ints, found NoneType"),
    ],
)
def test_a_bad_id_anywhere_in_a_long_prompt_is_named(where: int, bad: object, error: str) -> None:
    for container in (list, tuple):
        prompt = _ids()
        prompt[where] = bad  # type: ignore[call-overload]
        with pytest.raises(InvalidRequestError, match=error):
            prompt_token_ids(container(prompt), NoText(), VOCAB)


def test_a_long_prompts_ids_are_python_ints_in_a_list_of_its_own() -> None:
    prompt = _ids()
    mixed: list[object] = list(prompt)
    mixed[65_540] = np.int64(mixed[65_540])  # type: ignore[call-overload]
    for given in (prompt, tuple(prompt), mixed, np.array(prompt)):
        ids = prompt_token_ids(given, NoText(), VOCAB)
        assert ids == prompt and all(type(i) is int for i in ids[65_530:65_550])
        assert ids is not given
    ids = prompt_token_ids(prompt, NoText(), VOCAB)
    prompt[3] = 7  # the caller reuses its list: the request's stays as it was
    assert ids[3] == 3


def test_a_long_text_encoding_to_ids_beyond_the_vocabulary_is_refused() -> None:
    ids = _ids()
    assert prompt_token_ids("text", Ids(ids), VOCAB) == ids
    ids[2 * 65_536 + 9] = VOCAB + 4
    with pytest.raises(InvalidRequestError, match=r"the model does not have: \[1004\]"):
        prompt_token_ids("text", Ids(ids), VOCAB)


async def test_tokenizer_work_runs_on_one_thread_of_its_own_at_a_lower_priority() -> None:
    def where() -> tuple[int, int]:
        native = threading.get_native_id()
        return native, os.getpriority(os.PRIO_PROCESS, native) if sys.platform == "linux" else 0

    first, second = await run_off_loop(where), await run_off_loop(where)
    assert first == second  # the same thread
    assert first[0] != threading.get_native_id()
    if sys.platform == "linux":
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert first[1] == min(19, loop_nice + TOKENIZER_NICE)


async def test_a_cancelled_caller_returns_at_once_and_its_queued_call_never_runs() -> None:
    release = threading.Event()
    ran: list[str] = []

    def hold() -> None:
        ran.append("hold")
        release.wait(10)

    queued = anyio.Event()

    async def call_queued() -> None:
        queued.set()  # then, with no await between, its call is queued
        await run_off_loop(ran.append, "queued")

    async with anyio.create_task_group() as group:
        group.start_soon(run_off_loop, hold)
        with anyio.fail_after(10):
            while not ran:
                await anyio.sleep(0.005)
        group.start_soon(call_queued)
        await queued.wait()
        await anyio.sleep(0)
        started = time.monotonic()
        group.cancel_scope.cancel()
    assert time.monotonic() - started < 1.0  # while `hold` still holds the thread
    release.set()
    assert await run_off_loop(ran.append, "after") is None
    assert ran == ["hold", "after"]


_CHILD = """
import asyncio, os, sys, threading
from medha.request_prompt import run_off_loop

assert asyncio.run(run_off_loop(lambda: 1)) == 1  # the parent's tokenizer thread exists
child = os.fork()
if child == 0:
    try:
        result = asyncio.run(asyncio.wait_for(run_off_loop(lambda: 2), 10))
    except BaseException:
        os._exit(1)
    os._exit(0 if result == 2 else 1)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_starts_a_tokenizer_thread_of_its_own() -> None:
    result = subprocess.run([sys.executable, "-c", _CHILD], timeout=60)
    assert result.returncode == 0


_NICE_OF_THREADS = """
import asyncio, glob, os, threading
from medha.model.presets import materialize_preset
from medha.model.tokenizer import Tokenizer
from medha.request_prompt import run_off_loop

tokenizer = Tokenizer.from_folder(materialize_preset("tiny-random"))
# The first encode of the process, on the tokenizer thread: the tokenizers library starts
# its worker pool.
asyncio.run(run_off_loop(tokenizer.hf_tokenizer, ["some text"] * 64))
for task in sorted(glob.glob("/proc/self/task/*")):
    fields = open(task + "/stat").read().rsplit(")", 1)[1].split()
    print(fields[16])  # the thread's nice value
"""


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_only_the_tokenizer_thread_runs_at_the_lower_priority() -> None:
    """Not the tokenizers library's worker pool, which a first encode there would start."""
    result = subprocess.run(
        [sys.executable, "-c", _NICE_OF_THREADS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    nice = [int(line) for line in result.stdout.split()]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = min(19, own + TOKENIZER_NICE)
    assert nice.count(lowered) == 1 and len(nice) > 2
    assert set(nice) == {own, lowered}


async def test_a_tokenizer_thread_whose_set_up_fails_runs_all_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> None:
        raise RuntimeError("no pool")

    monkeypatch.setattr(request_prompt, "_start_tokenizers_pool", broken)
    monkeypatch.setattr(request_prompt, "_executor", None)  # a thread of its own, set up anew
    try:
        assert await run_off_loop(lambda: 5) == 5
    finally:
        executor = request_prompt._executor
        assert executor is not None
        executor.shutdown()
