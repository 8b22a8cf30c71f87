"""KVP groups as data-parallel replicas (DESIGN section 8): a short request runs on its own group
only, a long one on each group holding part of its KV, and the outputs are still exactly one
process's and HF's. Three groups, so that a long request can also spread over groups the
sampling group is not one of (that group then sits out the merges and samples from rows sent
to it). Without max_tokens_per_kvp_group, no request spreads: the groups are replicas only."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
import torch

import medha
from medha import SamplingParams
from medha.parallel.messages import ShardStep
from tests import parallel_support as support

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[list[ShardStep]]:
    """Every step the engine sends its workers, one ShardStep per KVP group."""
    from medha.parallel.cluster import Cluster

    steps_sent: list[list[ShardStep]] = []
    submit = Cluster.submit

    def recording(self: Cluster, steps: list[ShardStep], on_done: Any) -> None:
        steps_sent.append(steps)
        submit(self, steps, on_done)

    monkeypatch.setattr(Cluster, "submit", recording)
    return steps_sent


def _groups_run_on(sent: list[list[ShardStep]]) -> dict[str, set[int]]:
    """The KVP groups each request's steps ran on."""
    ran_on: dict[str, set[int]] = {}
    for steps in sent:
        for group, step in enumerate(steps):
            for shard_work in step.seqs:
                if shard_work.runs:
                    ran_on.setdefault(shard_work.request_id, set()).add(group)
    return ran_on


async def test_groups_serve_short_requests_side_by_side(sent: list[list[ShardStep]]) -> None:
    work = support.workload(seed=31, count=9, long_prompts=3)
    done: list[medha.Completion] = []
    async with medha.Engine(support.parallel_config(1, 1, 3)) as engine:
        actor = engine._scheduler_actor
        actor.record_logits = True  # type: ignore[union-attr]

        async def one(i: int) -> None:
            # Prompt logprobs too: the rows that score a prompt go to group 0 as well.
            await anyio.sleep(0.002 * i)
            prompt, max_tokens = work[i]
            params = SamplingParams.greedy(max_tokens, ignore_eos=True, prompt_logprobs=2)
            done.append(await engine.generate(prompt, params, request_id=f"r{i}"))

        async with anyio.create_task_group() as group:
            for i in range(len(work)):
                group.start_soon(one, i)
        # A long request alone: one group has nothing at all to run, yet joins its merges.
        alone = await engine.generate(work[0][0], SamplingParams.greedy(4, ignore_eos=True))
        logits = support.logits_by_request(actor.logits_log)  # type: ignore[union-attr]
        assert engine.stats().free_blocks == engine.stats().total_blocks

    outputs = {completion.request_id: completion for completion in done}
    for i, (prompt, max_tokens) in enumerate(work):
        completion = outputs[f"r{i}"]
        tokens = completion.token_ids
        assert tokens == support.hf_greedy(prompt, max_tokens), f"request {i}"
        support.assert_prompt_logprobs_equal_hf(completion, 2)
        rows = torch.stack(logits[f"r{i}"])
        expected = support.hf_logits(prompt + tokens[:-1])[len(prompt) - 1 :]
        error = float((rows - expected).abs().max() / expected.abs().max())
        assert error < 1e-4, f"request {i}: relative logit error {error:.2e}"

    ran_on = _groups_run_on(sent)
    shorts = [f"r{i}" for i in range(3, len(work))]
    # Each short request ran on one group only, and the groups shared them out.
    assert all(len(ran_on[request]) == 1 for request in shorts), ran_on
    assert len(Counter(next(iter(ran_on[request])) for request in shorts)) >= 2, ran_on
    # The long ones ran on two groups each, merged there.
    assert all(len(ran_on[f"r{i}"]) == 2 for i in range(3)), ran_on
    # Some merge went on without one of the groups running any of its rows, and the sampling
    # group sampled a token from rows another group sent it.
    assert any(
        step.merge_rows and not any(w.runs and w.merge_offset is not None for w in step.seqs)
        for steps in sent
        for step in steps
    )
    assert alone.token_ids == support.hf_greedy(work[0][0], 4)
    assert any(step.merge_rows and not step.seqs for steps in sent for step in steps)
    # A long request spread over groups 1 and 2: group 0 joined the merge with neutral rows
    # and sampled from the rows the appending group sent.
    assert any(
        not w.runs
        and w.reporter is not None
        and any(
            r.request_id == w.request_id and r.merge_offset is not None
            for r in steps[w.reporter].seqs
        )
        for steps in sent
        for w in steps[0].seqs
    )
    reported = [w for steps in sent for w in steps[0].seqs if not w.runs and w.reporter is not None]
    assert any(w.samples for w in reported) and any(w.score_rows for w in reported)


async def test_without_a_shard_size_the_groups_are_data_parallel_replicas(
    sent: list[list[ShardStep]],
) -> None:
    # No max_tokens_per_kvp_group: no request ever spreads, long or short; each runs on one
    # group, the groups share them out, and nothing is merged.
    work = support.workload(seed=5, count=6, long_prompts=2)
    parallel = medha.ParallelConfig(kvp=2, timeout_s=120)
    async with medha.Engine(support.parallel_config(1, 1, 2, parallel=parallel)) as engine:
        outputs = await support.run_concurrently(engine, work)
        assert engine.max_model_len == 2048  # the model's context: one group holds it all
        assert engine.stats().free_blocks == engine.stats().total_blocks
    for i, ((prompt, max_tokens), tokens) in enumerate(zip(work, outputs, strict=True)):
        assert tokens == support.hf_greedy(prompt, max_tokens), f"request {i}"
    assert all(step.merge_rows == 0 for steps in sent for step in steps)
    ran_on = _groups_run_on(sent)
    assert all(len(groups) == 1 for groups in ran_on.values()), ran_on
    assert {group for groups in ran_on.values() for group in groups} == {0, 1}, ran_on
