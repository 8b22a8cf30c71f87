"""Workloads: where traces come from, what the generators produce, and clear CSV errors."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from medha.sim import (
    PAPER_LONG_MIX,
    LogNormalLengths,
    TraceError,
    WorkloadError,
    load_trace,
    percentile,
    poisson_arrivals,
    read_requests_csv,
    synthetic_workload,
)
from medha.sim.traces import BUNDLED_DIR, TRACE_FILES, TRACES_ENV


@pytest.fixture
def bundled_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the 400-row samples shipped in the package, whatever the machine has."""
    monkeypatch.setenv(TRACES_ENV, str(BUNDLED_DIR))


# -- traces -------------------------------------------------------------------------------


@pytest.mark.usefixtures("bundled_traces")
@pytest.mark.parametrize("name", sorted(TRACE_FILES))
def test_every_bundled_trace_sample_loads_with_positive_lengths(name: str) -> None:
    trace = load_trace(name)
    assert len(trace) >= 350  # 400 rows, a few dropped by the 8K cap at most
    assert min(trace.prompt_tokens) >= 1 and min(trace.output_tokens) >= 1
    assert trace.source.parent == BUNDLED_DIR


@pytest.mark.usefixtures("bundled_traces")
def test_sharegpt_is_capped_at_8k_tokens_as_in_the_paper() -> None:
    trace = load_trace("sharegpt")
    totals = [p + o for p, o in zip(trace.prompt_tokens, trace.output_tokens, strict=True)]
    assert max(totals) <= 8192
    # The sample follows the full trace's medians (1730 prompt / 415 output tokens).
    assert 1200 < statistics.median(trace.prompt_tokens) < 2300
    assert 300 < statistics.median(trace.output_tokens) < 550


def test_a_traces_dir_from_the_environment_without_the_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACES_ENV, str(tmp_path))
    with pytest.raises(TraceError, match=TRACES_ENV):
        load_trace("sharegpt")


def test_without_the_environment_variable_a_trace_is_always_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TRACES_ENV, raising=False)
    trace = load_trace("conv")
    assert trace.source.is_file()
    assert trace.is_sample == (trace.source.parent == BUNDLED_DIR)


def test_unknown_trace_names_list_the_known_ones() -> None:
    with pytest.raises(TraceError, match="sharegpt"):
        load_trace("alpaca")


HEADER = "num_prefill_tokens,num_decode_tokens\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (HEADER.encode() + b"5,\xff\n", "not a UTF-8 text file"),
        (HEADER.encode() + b"5," + b"9" * 200_000 + b"\n", "not a readable CSV file"),
        (HEADER.encode(), "no requests"),
        (b"num_prefill_tokens\n5\n", "missing column"),
    ],
    ids=["not-utf8", "huge-field", "header-only", "missing-column"],
)
def test_a_trace_file_that_cannot_be_read_is_a_trace_error_naming_it(
    content: bytes, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACES_ENV, str(tmp_path))
    (tmp_path / TRACE_FILES["conv"]).write_bytes(content)
    with pytest.raises(TraceError, match=message) as raised:
        load_trace("conv")
    assert TRACE_FILES["conv"] in str(raised.value)


def test_a_trace_may_start_with_a_byte_order_mark(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACES_ENV, str(tmp_path))
    (tmp_path / TRACE_FILES["conv"]).write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"5,7\n")
    assert load_trace("conv").prompt_tokens == (5,)


# -- generators -----------------------------------------------------------------------------


def test_poisson_arrivals_have_mean_gap_one_over_qps() -> None:
    times = poisson_arrivals(20_000, 4.0, random.Random(1))
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean
    assert times == sorted(times)


def test_lognormal_fit_reproduces_the_two_quantiles_it_was_fitted_to() -> None:
    lengths = LogNormalLengths(median=393_000, p90=839_000)
    assert math.exp(lengths.mu) == pytest.approx(393_000)
    assert math.exp(lengths.mu + 1.2815515655 * lengths.sigma) == pytest.approx(839_000)
    with pytest.raises(WorkloadError):
        LogNormalLengths(median=10, p90=5)


def test_long_mix_matches_the_papers_prefill_and_decode_quantiles() -> None:
    rng = random.Random(7)
    samples = [PAPER_LONG_MIX.sample(rng) for _ in range(20_000)]
    prompts = [float(p) for p, _ in samples]
    outputs = [float(o) for _, o in samples]
    assert percentile(prompts, 50) == pytest.approx(393_000, rel=0.04)
    assert percentile(prompts, 90) == pytest.approx(839_000, rel=0.04)
    assert percentile(outputs, 50) == pytest.approx(518, rel=0.04)
    assert percentile(outputs, 90) == pytest.approx(808, rel=0.04)
    assert all(p + o <= PAPER_LONG_MIX.max_context for p, o in samples)


@pytest.mark.usefixtures("bundled_traces")
def test_synthetic_workload_has_exactly_the_requested_share_of_long_requests() -> None:
    requests = synthetic_workload(load_trace("sharegpt"), 400, 1.0, seed=3, long_fraction=0.05)
    long = [r for r in requests if r.label == "long"]
    assert len(long) == 20
    assert min(r.prompt_tokens for r in long) >= 32_768
    assert max(r.prompt_tokens + r.output_tokens for r in requests if r.label == "short") <= 8192
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert len({r.request_id for r in requests}) == 400


@pytest.mark.usefixtures("bundled_traces")
def test_the_same_seed_gives_the_same_workload_and_qps_only_rescales_time() -> None:
    trace = load_trace("arxiv")
    first = synthetic_workload(trace, 50, 1.0, seed=11, long_fraction=0.1)
    assert synthetic_workload(trace, 50, 1.0, seed=11, long_fraction=0.1) == first
    assert synthetic_workload(trace, 50, 1.0, seed=12, long_fraction=0.1) != first
    faster = synthetic_workload(trace, 50, 2.0, seed=11, long_fraction=0.1)
    assert [r.prompt_tokens for r in faster] == [r.prompt_tokens for r in first]
    for slow, fast in zip(first, faster, strict=True):
        assert fast.arrival == pytest.approx(slow.arrival / 2)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"num_requests": 0}, "num_requests"), ({"long_fraction": 1.5}, "long_fraction")],
)
@pytest.mark.usefixtures("bundled_traces")
def test_impossible_workload_parameters_are_rejected(kwargs: dict, problem: str) -> None:
    args = {"num_requests": 10, "qps": 1.0, "seed": 0, **kwargs}
    with pytest.raises(WorkloadError, match=problem):
        synthetic_workload(load_trace("conv"), **args)
    with pytest.raises(WorkloadError, match="qps"):
        poisson_arrivals(3, 0.0, random.Random(0))


# -- user CSV -------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requests.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_workload_csv_is_read_sorted_with_optional_deadline_and_label(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "arrival_time,prompt_tokens,output_tokens,deadline,label\n"
        "2.5,100,10,,chat\n"
        "0.5,400000,500,90,doc\n",
    )
    first, second = read_requests_csv(path)
    assert (first.arrival, first.prompt_tokens, first.deadline, first.label) == (
        0.5,
        400_000,
        90.0,
        "doc",
    )
    assert (second.arrival, second.output_tokens, second.deadline, second.label) == (
        2.5,
        10,
        None,
        "chat",
    )


def test_required_columns_alone_are_enough(tmp_path: Path) -> None:
    (request,) = read_requests_csv(
        write(tmp_path, "prompt_tokens,arrival_time,output_tokens\n5,0,1\n")
    )
    assert (request.prompt_tokens, request.label, request.deadline) == (5, "csv", None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("arrival_time,prompt_tokens,output_tokens\n", "no requests"),
        ("arrival_time,prompt_tokens\n0,5\n", "missing column(s) output_tokens"),
        (
            "arrival_time,prompt_tokens,output_tokens,deadlines\n0,5,1,2\n",
            "unknown column(s) deadlines",
        ),
        (
            "arrival_time,prompt_tokens,output_tokens\n0,5,1\n1,lots,1\n",
            ":3: prompt_tokens must be an integer, got 'lots'",
        ),
        (
            "arrival_time,prompt_tokens,output_tokens\n0,5.5,1\n",
            ":2: prompt_tokens must be an integer",
        ),
        ("arrival_time,prompt_tokens,output_tokens\n-1,5,1\n", ":2: arrival_time must be >= 0"),
        ("arrival_time,prompt_tokens,output_tokens\n0,0,1\n", ":2: prompt_tokens must be >= 1"),
        (
            "arrival_time,prompt_tokens,output_tokens,deadline\n0,5,1,0\n",
            ":2: deadline must be > 0",
        ),
        ("arrival_time,prompt_tokens,output_tokens\nnan,5,1\n", ":2: arrival_time must be >= 0"),
        ("arrival_time,prompt_tokens,output_tokens\n0,5,1,9\n", ":2: more fields than columns"),
        # Blank lines count: the error names the line an editor shows.
        ("arrival_time,prompt_tokens,output_tokens\n\n0,5,1\n\n1,x,1\n", ":5: prompt_tokens"),
        (
            "arrival_time,prompt_tokens,output_tokens,arrival_time\n0,5,1,3\n",
            "column(s) arrival_time given twice",
        ),
        (
            "arrival_time,prompt_tokens,output_tokens,label\n0,5,1," + "x" * 200_000 + "\n",
            "not a readable CSV file (field larger than field limit",
        ),
    ],
)
def test_csv_errors_name_the_file_line_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(WorkloadError) as caught:
        read_requests_csv(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_a_spreadsheets_byte_order_mark_is_no_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfarrival_time,prompt_tokens,output_tokens\r\n0,5,1\r\n")
    (request,) = read_requests_csv(path)
    assert (request.arrival, request.prompt_tokens, request.output_tokens) == (0.0, 5, 1)


def test_a_missing_csv_is_a_workload_error(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read"):
        read_requests_csv(tmp_path / "nope.csv")
