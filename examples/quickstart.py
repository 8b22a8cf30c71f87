"""Stream tokens from medha in a plain script.

python examples/quickstart.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse

import anyio

import medha


async def main(model: str) -> None:
    config = medha.EngineConfig(model=model)
    async with medha.Engine(config) as engine:
        params = medha.SamplingParams(max_tokens=48, temperature=0.0)
        prompt = "The three most useful things to know about the Eiffel Tower are"
        # deadline: seconds to the first token; the scheduler orders work by it (LARS).
        async for event in engine.stream(prompt, params, deadline=2.0):
            print(event.text, end="", flush=True)
        print()
        done = await engine.generate("Once upon a time", params)
        print(
            f"\n{len(done.token_ids)} tokens, TTFT {done.metrics.ttft * 1000:.0f} ms, "
            f"deadline met: {done.metrics.deadline_met}"
        )
        print(engine.stats())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    anyio.run(main, parser.parse_args().model)
