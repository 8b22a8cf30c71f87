"""docs/cost-model.md's examples run and print what the page says they print."""

from __future__ import annotations

from pathlib import Path

from tests.docs_support import run_documented_examples

DOC = Path(__file__).resolve().parents[1] / "docs" / "cost-model.md"


def test_cost_model_doc_examples_print_the_documented_output() -> None:
    examples = run_documented_examples(DOC)
    # The model, fitting a profile to timings, and the online factors learning an executor.
    assert len(examples) == 3
    for printed, expected in examples:
        assert printed == expected
