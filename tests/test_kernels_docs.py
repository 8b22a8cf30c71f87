"""docs/kernels.md's example runs and prints what the page says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"


def test_backend_selection_example_prints_the_documented_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the page's premise
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```\n\nprints[^\n]*\n\n```text\n(.*?)```", text, re.S)
    assert match, "the example block followed by its printed output was not found"
    code, expected = match.groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    assert out.getvalue() == expected
