"""The multi-process engine keeps its cost model level too: each finished plan is an observation
of its predicted stage time against the longest any worker computed it, which leaves out the
time a micro-batch spends waiting in the pipeline."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

import medha
from medha.parallel.messages import ShardStep, ShardWork
from medha.perf.time_scale import OnlineTimeScale
from medha.sampling import SamplingSetup
from medha.scheduler.cost import SeqShape
from tests.parallel_support import parallel_config, run_concurrently, single_process_greedy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Observations:
    """Wraps a tracker's observe_batch to keep what it was given, and every level the cost
    model has had (the level when each observation came)."""

    def __init__(self, tracker: OnlineTimeScale) -> None:
        self.seen: list[tuple[float, float, float]] = []
        self.levels = [tracker.cost.time_scale]
        observe = tracker.observe_batch

        def recording(seqs: Sequence[SeqShape], predicted: float, measured: float) -> None:
            self.seen.append((predicted, measured, tracker.cost.time_scale))
            observe(seqs, predicted, measured)
            self.levels.append(tracker.cost.time_scale)

        tracker.observe_batch = recording  # type: ignore[method-assign]


async def test_a_pipeline_learns_from_stage_compute_time_not_time_in_flight() -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(503) for _ in range(n)] for n in (300, 40, 25, 60)]
    config = parallel_config(1, 2, 1, target_batch_time=0.01, max_chunk=128, num_blocks=256)
    async with medha.Engine(config, record_iterations=True) as engine:
        actor = engine._scheduler_actor
        assert actor is not None and actor.time_scale is not None
        observations = _Observations(actor.time_scale)
        completed = []
        on_step_done = actor.scheduler.on_step_done

        def recording_plans(plan, now, finished):  # type: ignore[no-untyped-def]
            completed.append(plan)
            return on_step_done(plan, now, finished)

        actor.scheduler.on_step_done = recording_plans  # type: ignore[method-assign]
        outputs = await run_concurrently(engine, [(p, 5) for p in prompts])
        history = engine.iteration_history
        stats = engine.stats()
        tracker = actor.time_scale
    assert outputs == [single_process_greedy(p, 5) for p in prompts]
    assert len(observations.seen) == len(history) == stats.iterations > 0
    assert tracker.cost is actor.scheduler.cost
    assert len(completed) == len(history)
    stage_differs = 0
    for index, ((predicted, measured, level), record, plan) in enumerate(
        zip(observations.seen, history, completed, strict=True)
    ):
        # Two stages: one stage's predicted time, not the whole batch's, brought to the level
        # of now from the level it was priced at (one the cost model had before).
        level_priced_at = level * plan.predicted_stage_time / predicted
        assert any(
            math.isclose(level_priced_at, earlier, rel_tol=1e-9)
            for earlier in observations.levels[: index + 1]
        )
        stage_differs += plan.predicted_stage_time < plan.predicted_time
        # One stage's compute, not the plan's time from issue to tokens (both stages and the
        # hand-over between them, and any wait behind the micro-batch ahead).
        assert 0 < measured < record.seconds
    assert stage_differs == len(completed)
    assert stats.time_scale != 1.0


class _SlowStage:
    """A stage model that takes `seconds` and passes its inputs on."""

    def __init__(self, seconds: float) -> None:
        self.arch = SimpleNamespace(hidden_size=4)
        self.seconds = seconds

    def __call__(self, inputs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(self.seconds)
        return inputs

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@pytest.mark.parametrize("last", [False, True])
def test_a_worker_times_its_stage_from_when_its_inputs_arrive(
    monkeypatch: pytest.MonkeyPatch, last: bool
) -> None:
    """A later stage waits for the previous one's hidden states (here 0.4 s): its reported
    seconds are only its own work (0.05 s), whether it sends on or samples."""
    import medha.actors.remote_stage as remote_stage

    monkeypatch.setattr(remote_stage.dist, "recv", lambda tensor, src: time.sleep(0.4))
    monkeypatch.setattr(
        remote_stage.dist, "isend", lambda tensor, dst: SimpleNamespace(wait=lambda: None)
    )
    cache = SimpleNamespace(k=[torch.zeros(1)], block_size=16)
    stage = remote_stage.RemoteStage(
        1,
        _SlowStage(0.05),  # type: ignore[arg-type]
        cache,  # type: ignore[arg-type]
        lambda *args: None,  # type: ignore[arg-type,return-value]
        prev_rank=0,
        next_rank=None if last else 2,
        samples=last,
        heads=last,
        kvp_merge=None,
        device=torch.device("cpu"),
        pp=2,
    )
    if last:
        monkeypatch.setattr(
            remote_stage,
            "sample_requests",
            lambda rows, requests, masks: SimpleNamespace(
                token_ids=[3], logprobs=[-0.1], top_logprobs=[()]
            ),
        )
    greedy = SamplingSetup(medha.SamplingParams(max_tokens=1, temperature=0.0), prompt_len=3)
    work = ShardWork(
        request_id="r",
        start=0,
        token_ids=(1, 2, 3),
        new_blocks=(0,),
        samples=True,
        sampling=greedy,
        kv_start=0,
        kv_end=0,
        appends=True,
    )
    done = stage.submit(ShardStep(0, 0, (work,))).wait()
    assert 0.05 <= done.seconds < 0.3
    if last:
        assert done.output is not None and done.output.seconds == done.seconds  # type: ignore[attr-defined]
