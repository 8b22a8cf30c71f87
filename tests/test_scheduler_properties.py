"""Properties over random workloads x every policy x KVP 1/2/4 x PP 1/2, with random EOS and
aborts. The driver (tests/scheduler_support.py) checks every plan as the engine would see it:
decodes first and never skipped while ready, chunk sizes within bounds, no chunk across a KVP
boundary, block ids never handed out twice and always covering the KV written, SPP rules."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medha.scheduler import POLICY_NAMES, SchedulerConfig
from tests.scheduler_support import Arrival, drive_random_workload


@st.composite
def configs(draw: st.DrawFn) -> SchedulerConfig:
    kvp = draw(st.sampled_from([1, 2, 4]))
    limit = draw(st.sampled_from([None, 256, 1024])) if kvp > 1 else None
    return SchedulerConfig(
        policy=draw(st.sampled_from(POLICY_NAMES)),
        kvp_groups=kvp,
        max_tokens_per_kvp_group=limit,
        pp_stages=draw(st.sampled_from([1, 2])),
        spp=draw(st.booleans()),
        num_blocks=draw(st.integers(24, 160)),
        target_batch_time=draw(st.sampled_from([0.01, 0.03, 0.06])),
        max_batch_size=draw(st.integers(2, 32)),
        fixed_chunk=draw(st.sampled_from([64, 512])),
        long_prefill_threshold=draw(st.sampled_from([256, 1024, 262_144])),
    )


@st.composite
def workloads(draw: st.DrawFn) -> list[Arrival]:
    count = draw(st.integers(1, 12))
    arrivals = []
    for index in range(count):
        arrivals.append(
            Arrival(
                request_id=f"r{index}",
                arrival=draw(st.floats(0.0, 1.0)),
                prompt_len=draw(st.integers(1, 2500)),
                max_new_tokens=draw(st.integers(1, 40)),
                deadline=draw(st.none() | st.floats(0.05, 2.0)),
                stop_after=draw(st.none() | st.integers(1, 40)),
                abort_at=draw(st.none() | st.floats(0.0, 2.0)) if draw(st.booleans()) else None,
                scores_prompt=draw(st.booleans()),
            )
        )
    return arrivals


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(config=configs(), arrivals=workloads())
def test_random_workloads_finish_every_request_and_leak_no_block(
    config: SchedulerConfig, arrivals: list[Arrival]
) -> None:
    scheduler, arrivals = drive_random_workload(config, arrivals)
    stats = scheduler.stats()
    assert stats.finished + stats.aborted == len(arrivals)
    assert (stats.waiting, stats.running, stats.plans_in_flight) == (0, 0, 0)
