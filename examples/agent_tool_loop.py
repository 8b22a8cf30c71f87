"""An agent-style loop: several agents share one engine, each alternating model turns (streamed)
with a tool call (a Python function), with a tight deadline on interactive turns.

The tools are deliberately simple (arithmetic on numbers the agent is given); the point is the
shape of the code: stream a thought, stop at a marker, have the model choose a tool as JSON
under a schema (structured outputs: the call always parses, whatever the model), run it, feed
its result back, and let the engine's scheduler interleave the agents' requests.

    python examples/agent_tool_loop.py [--model smollm2-135m] [--agents 3]
"""

from __future__ import annotations

import argparse
import json
import random

import anyio

import medha

TOOLS = {"sum": sum, "max": max, "min": min}
TOOL_CALL = medha.StructuredOutputsParams(
    json={
        "type": "object",
        "properties": {"tool": {"enum": sorted(TOOLS)}},
        "required": ["tool"],
        "additionalProperties": False,
    },
    disable_any_whitespace=True,
)


async def agent(engine: medha.Engine, name: str, numbers: list[int], turns: int) -> None:
    transcript = f"You are {name}, a careful assistant. Numbers: {numbers}. Tools: sum, max, min.\n"
    thinking = medha.SamplingParams(max_tokens=24, temperature=0.0, stop=["\n"])
    acting = medha.SamplingParams(max_tokens=16, temperature=0.0, structured_outputs=TOOL_CALL)
    for turn in range(turns):
        transcript += f"Thought {turn + 1}:"
        reply = ""
        # Interactive turns get a tight time-to-first-token deadline.
        async for event in engine.stream(transcript, thinking, deadline=1.0):
            reply += event.text
        transcript += reply + "\nAction: "
        call = await engine.generate(transcript, acting, deadline=1.0)
        tool = json.loads(call.text)["tool"]  # valid under TOOL_CALL, so one of TOOLS
        observation = f"{tool}={TOOLS[tool](numbers)}"
        transcript += f"{call.text}\nObservation: {observation}\n"
        print(f"[{name}] turn {turn + 1}: {reply.strip()!r} -> {call.text} -> {observation}")


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
