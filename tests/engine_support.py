"""Shared set-up of the engine tests: a tiny model, a cost profile calibrated once per session,
and the "request alone" reference outputs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from contextlib import aclosing
from functools import cache
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

import medha.request_prompt
from medha.actors.tracked import TrackedRequest
from medha.config import EngineConfig
from medha.errors import EngineFailedError
from medha.model.setup import build_runner
from medha.model.single import generate_single
from medha.output_text import OutputText
from medha.request import RequestMetrics
from medha.sampling import SamplingParams

MODEL = "tiny-random"


@cache
def hf_model() -> Any:
    """HF transformers' model of MODEL's weights, fp32, for reference outputs and logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from medha.model.presets import materialize_preset

    model = AutoModelForCausalLM.from_pretrained(
        materialize_preset(MODEL), torch_dtype=torch.float32
    )
    return model.eval()


@cache
def cost_profile_path(model: str = MODEL) -> Path:
    """Calibrate `model` once and save the profile, so engines start in ~0.2 s (an engine
    refuses a profile calibrated for another model's shapes)."""
    import tempfile

    from medha.calibration import calibrate_runner
    from medha.perf import save_profile

    runner, _ = build_runner(model, num_blocks=512)
    result, _ = calibrate_runner(runner, budget_s=1.5)
    path = Path(tempfile.mkdtemp(prefix="medha-test-")) / "cpu-profile.json"
    save_profile(result.profile, path)
    return path


def engine_config(**overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = {
        "model": MODEL,
        "cost_profile": cost_profile_path(),
        "num_blocks": 1024,
    }
    settings.update(overrides)
    return EngineConfig(**settings)


async def run_all_greedy(
    engine: Any, work: Sequence[tuple[Sequence[int], int]], stagger: float = 0.0
) -> list[list[int]]:
    """Run every (prompt, max_tokens) of `work` concurrently and greedily, request i arriving
    `stagger * i` seconds after the first; their token ids, in order."""
    results: list[list[int]] = [[] for _ in work]

    async def one(i: int) -> None:
        await anyio.sleep(stagger * i)
        prompt, max_tokens = work[i]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        results[i] = (await engine.generate(list(prompt), params)).token_ids

    async with anyio.create_task_group() as group:
        for i in range(len(work)):
            group.start_soon(one, i)
    return results


@cache
def _alone_runner() -> Any:
    return build_runner(MODEL, num_blocks=512)


def greedy_alone(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """The greedy tokens of `prompt` run alone, chunk by chunk, without any scheduler."""
    runner, tokenizer = _alone_runner()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [t.token_id for t in generate_single(runner, list(prompt), params, tokenizer)]


class StreamsUntilFailure:
    """Long greedy streams that count their tokens and keep the EngineFailedError that ends
    them: the fault tests open them, break something, and wait for every one to fail."""

    def __init__(self, count: int = 2, max_tokens: int = 1500) -> None:
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.counts = [0] * count
        self.errors: list[BaseException] = []
        self._all_streaming = anyio.Event()

    def start(self, group: TaskGroup, engine: Any) -> None:
        for index in range(len(self.counts)):
            group.start_soon(self._consume, engine, index)

    async def _consume(self, engine: Any, index: int) -> None:
        try:
            async for _ in engine.stream([5 + index, 6, 7], self.params):
                self.counts[index] += 1
                if all(self.counts):
                    self._all_streaming.set()
        except EngineFailedError as exc:
            self.errors.append(exc)

    async def wait_streaming(self, timeout_s: float = 30.0) -> None:
        """Until every stream has its first token."""
        with anyio.fail_after(timeout_s):
            await self._all_streaming.wait()

    async def wait_failed(self, timeout_s: float = 10.0) -> None:
        """Until every stream has ended with EngineFailedError (TimeoutError otherwise)."""
        with anyio.fail_after(timeout_s):
            while len(self.errors) < len(self.counts):
                await anyio.sleep(0.01)


def tracked_request(prompt: list[int], params: SamplingParams, **fields: Any) -> TrackedRequest:
    """The engine's record of a request "r", outside an engine (its text from CharDecoder)."""
    from tests.test_output_text import CharDecoder

    return TrackedRequest(
        request_id="r",
        prompt_ids=prompt,
        params=params,
        max_new_tokens=params.max_tokens or 0,
        output=OutputText(CharDecoder(), prompt, params),
        metrics=RequestMetrics(arrival=0.0, deadline=1.0),
        deadline=None,
        **fields,
    )


@cache
def grammar_compiler() -> Any:
    """A GrammarCompiler for MODEL's tokenizer and vocabulary, as an engine builds one."""
    from medha.grammar import GrammarCompiler
    from medha.model.loader import load_hf_folder
    from medha.model.presets import materialize_preset

    # The engine's tokenizer: its eos ids include those of config.json, which the grammar
    # allows where the output may end.
    tokenizer = load_hf_folder(materialize_preset(MODEL)).tokenizer
    return GrammarCompiler(tokenizer, hf_model().config.vocab_size)


def greedy_under_grammar(
    prompt: Sequence[int], structured: Any, max_tokens: int, eos_token_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy decoding over HF transformers' logits with every token the grammar of
    `structured` (StructuredOutputsParams) does not allow at -inf, by definition: until the
    output completes the grammar, ends with an eos token, or reaches `max_tokens`."""
    import numpy as np
    import torch

    matcher = grammar_compiler().matcher(structured)
    ids, out = list(prompt), []
    while len(out) < max_tokens:
        with torch.no_grad():
            logits = hf_model()(torch.tensor([ids])).logits[0, -1].clone()
        words = matcher.next_mask()
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        allowed = torch.from_numpy(bits[: logits.shape[0]])
        logits[~allowed] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
        matcher.accept(out[-1])
        if matcher.complete or out[-1] in eos_token_ids:
            break
    return out


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_cancelled_as_its_actors_start(engine: Any, monkeypatch: Any) -> None:
    """Start `engine` with its start cancelled once the model (or the workers) is up, as its
    actors start: deterministic, where cancelling a task at that moment is a race."""
    import asyncio

    import pytest

    async def cancelled(*args: object) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(medha.Engine, "_start_actors", cancelled)
    with pytest.raises(asyncio.CancelledError):
        await engine.start()


def long_from(monkeypatch: Any, length: int) -> None:
    """Make a prompt over `length` characters or ids long: prepared off the event loop."""
    monkeypatch.setattr(medha.request_prompt, "LONG_PROMPT", length)


class HeldEncode:
    """An engine's tokenizer, made to hold every encode of a long text until released (or for
    10 s), noting the threads it ran on."""

    def __init__(self, engine: Any, monkeypatch: Any) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: list[int] = []
        self.timed_out = False
        tokenizer = engine.tokenizer
        encode = tokenizer.encode

        def held(text: str, add_special_tokens: bool = True) -> list[int]:
            if len(text) > medha.request_prompt.LONG_PROMPT:
                self.threads.append(threading.get_ident())
                self.entered.set()
                self.timed_out |= not self.release.wait(10)
            return encode(text, add_special_tokens)

        monkeypatch.setattr(tokenizer, "encode", held)

    async def wait_entered(self) -> None:
        with anyio.fail_after(10):
            while not self.entered.is_set():
                await anyio.sleep(0.005)

    async def run_while_others_stream(self, engine: Any, call: Any) -> None:
        """Run `call()` (which tokenizes a long text) while a stream runs, and release the
        tokenizer once the engine has run 5 iterations with it held: on the event loop, the
        tokenizer would hold the engine still, until it gave up waiting (`timed_out`)."""
        params = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
        async with anyio.create_task_group() as group, aclosing(engine.stream("go", params)) as s:
            await anext(s)  # streaming
            group.start_soon(call)
            try:
                await self.wait_entered()
                start = engine.stats().iterations
                with anyio.fail_after(10):
                    while engine.stats().iterations < start + 5:
                        await anyio.sleep(0.005)
            finally:
                self.release.set()
        assert not self.timed_out and self.threads
        assert threading.get_ident() not in self.threads


async def idle(engine: Any) -> Any:
    """Until nothing runs or waits; then every KV block must be free. The engine's stats."""
    with anyio.fail_after(10):
        while (stats := engine.stats()).running or stats.waiting:
            await anyio.sleep(0.01)
    assert stats.free_blocks == stats.total_blocks
    return stats
