"""docs/cost-model.md's example runs and prints what the page says it prints."""

from __future__ import annotations

from pathlib import Path

from tests.docs_support import run_documented_example

DOC = Path(__file__).resolve().parents[1] / "docs" / "cost-model.md"


def test_cost_model_doc_example_prints_the_documented_output() -> None:
    printed, expected = run_documented_example(DOC)
    assert printed == expected
