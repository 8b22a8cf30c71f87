"""benchmarks/long_context_step.py runs end to end on small contexts (its numbers come from a
real run: benchmarks/results/long_context_step.txt)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "long_context_step.py"


def test_it_prints_a_row_per_context(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("long_context_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "REPEATS", 1)
    monkeypatch.setattr(sys, "argv", ["long_context_step.py", "--contexts", "512,2048"])
    bench.main()
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["context", "shorts"]
    assert [row.split()[0] for row in rows[1:]] == ["512", "2048"]
