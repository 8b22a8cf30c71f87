"""LLM: a synchronous front for scripts that do not want to write async code.

    llm = medha.LLM(medha.EngineConfig(model="smollm2-135m"))  # or medha.LLM("smollm2-135m")
    print(llm.generate(["What is the capital of France?"])[0].text)
    llm.close()

The engine runs on an event loop in a background thread (an anyio blocking portal), so this
also works where a loop already runs in the main thread (Jupyter): the library never takes over
the caller's loop.
"""

from __future__ import annotations

import numbers
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from medha.config import EngineConfig
from medha.engine import Engine
from medha.errors import EngineClosedError, InvalidRequestError
from medha.model.openmp import release_idle_threads
from medha.request import Completion, Prompt
from medha.sampling import SamplingParams


class LLM:
    def __init__(self, config: EngineConfig | str | None = None, **fields: Any) -> None:
        """`config`: an EngineConfig; or, as vLLM's `LLM(model, **kwargs)`, a model path or
        preset name and/or EngineConfig fields as keywords (validated as EngineConfig is)."""
        config = _engine_config(config, fields)
        self._runtime = _Runtime(Engine(config))
        self.engine = self._runtime.engine
        self._closed = False
        self._closing = threading.Lock()
        # Nothing the runtime runs refers to this LLM, so an LLM dropped without close() (a
        # notebook cell run again) is collected, and this stops its engine and thread.
        self._finalizer = weakref.finalize(self, _collected, self._runtime)
        self._finalizer.atexit = False  # at exit the daemon threads just end

    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        deadlines: Sequence[float | None] | None = None,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Run every prompt concurrently (they share batches) and return their Completions in
        order. One prompt (a str, a token-id list, a 1-D array) counts as a batch of one; a 2-D
        array is a batch of its rows. `sampling` (or, by vLLM's name, `sampling_params`): one
        SamplingParams for all, or one per prompt (as vLLM's LLM.generate takes them).
        `deadlines`: each prompt's TTFT deadline in seconds, or None. `use_tqdm`: a progress
        bar of the finished requests (vLLM's name). Every prompt is validated before any is
        queued: one bad prompt raises its typed error and nothing runs."""
        if self._closed:
            raise EngineClosedError("this LLM was closed")
        self._runtime.check_process()
        sampling = _one_sampling(sampling, sampling_params)
        batch = _prompt_batch(prompts)
        if deadlines is not None:
            if callable(getattr(deadlines, "tolist", None)):
                deadlines = deadlines.tolist()  # type: ignore[union-attr]  # numpy array
            if not isinstance(deadlines, Sequence) or isinstance(deadlines, str):
                raise InvalidRequestError(
                    f"deadlines must be a list (one per prompt) or None, got {deadlines!r}"
                )
            if len(deadlines) != len(batch):
                raise InvalidRequestError(f"{len(batch)} prompts but {len(deadlines)} deadlines")
        per_prompt = _sampling_per_prompt(sampling, len(batch))
        # This thread only waits while the model thread works; an idle OpenMP pool of its own
        # (any torch op the caller ran) would slow the model thread's (medha.model.openmp).
        release_idle_threads()

        async def run_all() -> list[Completion]:
            engine = self.engine
            requests = [
                engine._prepare(
                    prompt,
                    per_prompt[i],
                    None if deadlines is None else deadlines[i],
                    None,
                    cache_salt,
                )
                for i, (prompt, cache_salt) in enumerate(batch)
            ]
            try:
                # A long text's checks need its tokens, which a stream makes when it starts:
                # made now, one too long for the context raises before anything runs.
                for request in requests:
                    if request.unprepared_prompt is not None:
                        await engine._prepare_long_prompt(request)
            except BaseException:
                for request in requests:
                    request.close_unsubmitted()
                raise
            results: list[Completion | None] = [None] * len(batch)
            errors: list[Exception] = []

            async def one(index: int) -> None:
                try:
                    results[index] = await engine._complete(requests[index])
                    finished()
                except Exception as exc:
                    # The engine failed or closed, or this request did (a grammar violation):
                    # the call raises that error, and the others are aborted.
                    errors.append(exc)
                    group.cancel_scope.cancel()

            with _progress(len(batch) if use_tqdm else 0) as finished:
                async with anyio.create_task_group() as group:
                    for index in range(len(batch)):
                        group.start_soon(one, index)
            if errors:  # the error itself, as Engine.generate raises it, not an ExceptionGroup
                raise errors[0]
            return [r for r in results if r is not None]

        try:
            future = self._runtime.portal.start_task_soon(run_all)
        except RuntimeError as exc:  # the portal stopped: close() ran on another thread
            if self._closed:
                raise EngineClosedError("this LLM was closed") from exc
            raise
        try:
            return future.result()
        except BaseException:
            # This thread was interrupted (Ctrl-C in a script or a notebook): cancelling the
            # task aborts its requests, which would otherwise run on and share the batches of
            # the next call.
            future.cancel()
            raise

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        deadlines: Sequence[float | None] | None = None,
        *,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        """As vLLM's LLM.chat: `messages` is one conversation ([{"role": ..., "content": ...},
        ...]) or a list of them; each is rendered with the model's chat template and generated
        as `generate` does, one Completion per conversation, in order. `tools` (OpenAI's
        function definitions) go to the template, as in vLLM; the output is the model's text
        (the server reads tool calls from it: docs/server.md). `continue_final_message` (with
        add_generation_prompt=False) has the model go on with the last message, and
        `chat_template_kwargs` are the template's variables (Qwen 3's `enable_thinking`), as in
        vLLM. A tokenizer without a chat template raises ModelLoadError; malformed messages
        InvalidRequestError, before anything runs."""
        if self._closed:
            raise EngineClosedError("this LLM was closed")
        conversations = _conversations(messages)
        tokenizer = self.engine.tokenizer
        prompts = [
            tokenizer.apply_chat_template(
                list(c),
                add_generation_prompt,
                tools=tools,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
            )
            for c in conversations
        ]
        sampling = _one_sampling(sampling, sampling_params)
        return self.generate(prompts, sampling, deadlines, use_tqdm=use_tqdm)

    def close(self) -> None:
        """Stop the engine and its thread; idempotent, from any thread."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        self._runtime.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _one_sampling(sampling: Any, sampling_params: Any) -> Any:
    """`sampling`, given by medha's name or vLLM's (`sampling_params`), not both."""
    if sampling is not None and sampling_params is not None:
        raise TypeError("give sampling or (vLLM's name) sampling_params, not both")
    return sampling if sampling_params is None else sampling_params


@contextmanager
def _progress(total: int) -> Iterator[Callable[[], None]]:
    """A bar of `total` requests (none for 0); what it yields counts one finished."""
    if not total:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("Generating", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # On stderr, as vLLM's tqdm: a script's own output on stdout stays its own.
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("requests", total=total)
        yield partial(progress.advance, task)


def _engine_config(config: EngineConfig | str | None, fields: dict[str, Any]) -> EngineConfig:
    if isinstance(config, EngineConfig):
        if fields:
            raise TypeError("pass an EngineConfig or EngineConfig fields as keywords, not both")
        return config
    if isinstance(config, str):
        if "model" in fields:
            raise TypeError("the model is given twice (positionally and as model=)")
        return EngineConfig(model=config, **fields)
    if config is None:
        return EngineConfig(**fields)
    raise TypeError(f"LLM takes an EngineConfig or a model name, got {type(config).__name__}")


def _conversations(messages: object) -> list[Sequence[Mapping[str, Any]]]:
    """One conversation (a list of message dicts) as a batch of one; a list of them as is."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} dicts")
    if isinstance(messages[0], Mapping):
        return [messages]
    return list(messages)


def _prompt_batch(prompts: object) -> list[tuple[Prompt, str | None]]:
    """One prompt (a str, a token-id sequence, a 1-D array, vLLM's {"prompt": text} or
    {"prompt_token_ids": ids}, either with a "cache_salt") as a batch of one; a sequence or
    iterable of prompts (a 2-D array: one per row) as the batch. Each with its cache salt."""
    if not isinstance(prompts, str) and callable(getattr(prompts, "tolist", None)):
        prompts = prompts.tolist()  # type: ignore[attr-defined]  # numpy array, tensor
    if isinstance(prompts, str | Mapping):
        return [_vllm_prompt(prompts)]
    if not isinstance(prompts, Iterable):
        raise InvalidRequestError(
            f"prompts must be a str, a list of token ids or a list of prompts, got "
            f"{type(prompts).__name__}"
        )
    items = list(prompts)
    if items and _is_token_id(items[0]):
        return [(items, None)]
    return [_vllm_prompt(item) for item in items]


_VLLM_PROMPT_KEYS = ("prompt", "prompt_token_ids")


def _vllm_prompt(prompt: Any) -> tuple[Any, str | None]:
    """A prompt as the engine takes it, and its cache salt: vLLM's dict prompts (TextPrompt,
    TokensPrompt) as their text or ids and "cache_salt"; anything else as it is (the engine
    checks it)."""
    if not isinstance(prompt, Mapping):
        return prompt, None
    given = [key for key in _VLLM_PROMPT_KEYS if key in prompt]
    others = sorted(str(key) for key in prompt if key not in (*_VLLM_PROMPT_KEYS, "cache_salt"))
    if len(given) != 1 or others:
        raise InvalidRequestError(
            "a dict prompt is vLLM's {'prompt': text} or {'prompt_token_ids': ids}, with an "
            "optional 'cache_salt'" + (f" (medha takes no {', '.join(others)})" if others else "")
        )
    return prompt[given[0]], prompt.get("cache_salt")


def _is_token_id(item: object) -> bool:
    """As the engine reads token ids: any integer (numpy's too), not a bool."""
    return isinstance(item, numbers.Integral) and not isinstance(item, bool)


def _sampling_per_prompt(
    sampling: SamplingParams | Sequence[SamplingParams] | None, prompts: int
) -> list[SamplingParams | None]:
    """The SamplingParams of each of `prompts` prompts: one shared, or one per prompt (each
    checked by the engine, as a single one is)."""
    if sampling is None or isinstance(sampling, SamplingParams):
        return [sampling] * prompts
    if not isinstance(sampling, Sequence) or isinstance(sampling, str):
        raise InvalidRequestError(
            f"sampling must be a medha.SamplingParams, a list of them (one per prompt) or None, "
            f"got {type(sampling).__name__}"
        )
    if len(sampling) != prompts:
        raise InvalidRequestError(f"{prompts} prompts but {len(sampling)} SamplingParams")
    return list(sampling)


class _Runtime:
    """What an LLM runs: an event loop in a thread (an anyio blocking portal) and the engine
    served on it from one long task, which starts and stops it on the loop it belongs to."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pid = os.getpid()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._stop: anyio.Event | None = None
        try:
            self._served, _ = self.portal.start_task(self._serve)
        except BaseException:
            # Interrupted (Ctrl-C while the model loads) or failed: the portal cancels the
            # serving task as it exits with the error (exiting without one would wait for the
            # task, which, once started, waits for a stop nobody will ask for).
            self._portal_cm.__exit__(*sys.exc_info())
            raise

    async def _serve(self, *, task_status: TaskStatus[None]) -> None:
        self._stop = anyio.Event()
        async with self.engine:
            task_status.started()
            await self._stop.wait()

    def check_process(self) -> None:
        """A forked child has the LLM but not its threads: waiting on them would never end."""
        if os.getpid() != self.pid:
            raise EngineClosedError(
                "this LLM was created in another process (the parent of a fork): create one "
                "in this process"
            )

    def shutdown(self) -> None:
        """Stop the engine, then the loop's thread (in a forked child, nothing to stop)."""
        if os.getpid() != self.pid:
            return
        try:
            if self._stop is not None:
                self.portal.call(self._stop.set)
                self._served.result()
        finally:
            self._portal_cm.__exit__(None, None, None)


def _collected(runtime: _Runtime) -> None:
    """An LLM was collected without close(): stop what it ran, from a thread of its own (the
    collection may happen on any thread, the loop's own included, where waiting for the loop
    would never end)."""
    # The thread first: warnings may be errors (-W error), and the engine must stop anyway.
    threading.Thread(target=runtime.shutdown, name="medha-llm-shutdown", daemon=True).start()
    warnings.warn(
        f"a medha.LLM serving {runtime.engine.config.model!r} was collected without close(): "
        "use `with medha.LLM(...) as llm:` or call llm.close()",
        ResourceWarning,
        stacklevel=1,
    )
