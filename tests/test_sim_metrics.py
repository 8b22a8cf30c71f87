"""Metrics: percentiles as numpy computes them, and summaries of hand-built request records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medha.sim import RequestRecord, percentile, summarize


@given(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(0, 100),
)
def test_percentiles_interpolate_linearly_like_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-6)


def test_percentile_of_nothing_is_nan_and_out_of_range_is_an_error() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def record(request_id: str, arrival: float, first: float, finish: float, out: int) -> RequestRecord:
    return RequestRecord(request_id, "short", 0, arrival, 100, out, 0.5, first, finish)


def test_ttft_tpot_e2e_deadline_and_throughput_of_known_records() -> None:
    records = [
        record("a", 0.0, 0.2, 1.2, 11),  # ttft 0.2, tpot 0.1, met
        record("b", 1.0, 2.0, 2.0, 1),  # ttft 1.0, no tpot (one token), missed
        record("c", 2.0, 2.4, 3.0, 4),  # ttft 0.4, tpot 0.2, met
    ]
    summary = summarize(records)
    assert summary.requests == 3
    assert summary.ttft_p50 == pytest.approx(0.4)
    assert summary.tpot_p50 == pytest.approx(0.15)  # mean of 0.1 and 0.2
    assert summary.e2e_p99 == pytest.approx(np.percentile([1.2, 1.0, 1.0], 99))
    assert summary.deadline_attainment == pytest.approx(2 / 3)
    assert summary.throughput_rps == pytest.approx(1.0)  # 3 requests from t=0 to t=3
    assert summary.throughput_tokens_per_s == pytest.approx((300 + 16) / 3)


def test_an_empty_summary_serialises_undefined_statistics_as_null() -> None:
    summary = summarize([])
    data = summary.to_dict()
    assert data["requests"] == 0 and data["ttft_p50"] is None
    json.dumps(data, allow_nan=False)  # valid JSON, no NaN
