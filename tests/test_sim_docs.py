"""docs/simulator.md: its example prints what the page says, and its headline numbers are those
of the committed benchmark results."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.docs_support import run_documented_example

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "simulator.md"
RESULTS = ROOT / "benchmarks" / "results" / "paper_comparison.json"


def test_the_documented_example_prints_the_documented_output() -> None:
    printed, expected = run_documented_example(DOC)
    assert printed == expected


def test_the_page_quotes_the_committed_paper_comparison() -> None:
    text = DOC.read_text(encoding="utf-8")
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    ratios = results["ttft_ratios_fcfs_over_lars"]
    assert f"| {ratios['0.25']['median']:.1f}x" in text
    assert f"{ratios['0.25']['p99']:.1f}x / {ratios['0.75']['p99']:.1f}x" in text
    capacity = results["capacity_qps"]
    lars, fcfs = capacity["lars"]["attainment"]["qps"], capacity["fcfs"]["attainment"]["qps"]
    assert f"{lars:.3g} vs {fcfs:.2g} QPS: {lars / fcfs:.1f}x" in text
    for qps in ("0.25", "0.75"):
        lars_run = results["runs"][qps]["lars"]["all"]
        row = f"| {qps} | lars | "
        assert row in text
        line = text[text.index(row) :].splitlines()[0]
        assert f"{lars_run['deadline_attainment'] * 100:.1f} |" in line
    for image in re.findall(r"\]\((images/simulator/[^)]+)\)", text):
        assert (DOC.parent / image).is_file(), image
