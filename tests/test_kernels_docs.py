"""docs/kernels.md's example runs and prints what the page says it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs_support import run_documented_example

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def test_backend_selection_example_prints_the_documented_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the page's premise
    printed, expected = run_documented_example(DOC)
    assert printed == expected
