"""docs/models.md's example runs and prints what the page says it prints."""

from __future__ import annotations

from pathlib import Path

from tests.docs_support import run_documented_examples

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_doc_example_prints_the_documented_output() -> None:
    examples = run_documented_examples(DOC)
    assert len(examples) == 1  # Qwen3-8B with YaRN
    for printed, expected in examples:
        assert printed == expected
