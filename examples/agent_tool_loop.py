"""An agent-style loop: several agents share one engine, each alternating model turns (streamed)
with a tool call (a Python function), with a tight deadline on interactive turns.

The "tool" here is deliberately simple (arithmetic on numbers the agent is given); the point is
the shape of the code: stream a turn, stop at a marker, run a tool, feed its result back, and
let the engine's scheduler interleave the agents' requests.

    python examples/agent_tool_loop.py [--model smollm2-135m] [--agents 3]
"""

from __future__ import annotations

import argparse
import random

import anyio

import medha


def calculator(numbers: list[int]) -> str:
    return f"sum={sum(numbers)} max={max(numbers)}"


async def agent(engine: medha.Engine, name: str, numbers: list[int], turns: int) -> None:
    transcript = f"You are {name}, a careful assistant. Numbers: {numbers}.\n"
    params = medha.SamplingParams(max_tokens=24, temperature=0.0, stop=["\n"])
    for turn in range(turns):
        transcript += f"Thought {turn + 1}:"
        reply = ""
        # Interactive turns get a tight time-to-first-token deadline.
        async for event in engine.stream(transcript, params, deadline=1.0):
            reply += event.text
        transcript += reply + "\n"
        observation = calculator(numbers)  # the tool call
        transcript += f"Tool result: {observation}\n"
        print(f"[{name}] turn {turn + 1}: {reply.strip()!r} -> {observation}")


async def main(model: str, agents: int) -> None:
    rng = random.Random(0)
    async with medha.Engine(medha.EngineConfig(model=model)) as engine:
        async with anyio.create_task_group() as group:
            for index in range(agents):
                numbers = [rng.randint(1, 99) for _ in range(4)]
                group.start_soon(agent, engine, f"agent-{index}", numbers, 2)
        stats = engine.stats()
        print(f"{stats.finished} requests finished in {stats.iterations} iterations")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--agents", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.model, args.agents)
