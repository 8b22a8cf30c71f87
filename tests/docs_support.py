"""Runs a docs page's example: its ```python block, followed by "prints ..." and the ```text
block of what it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

_EXAMPLE = re.compile(r"```python\n(.*?)```\n\nprints[^\n]*\n\n```text\n(.*?)```", re.S)


def run_documented_example(doc: Path) -> tuple[str, str]:
    """(what the page's example prints when run, what the page says it prints)."""
    match = _EXAMPLE.search(doc.read_text(encoding="utf-8"))
    assert match, f"{doc.name}: no example block followed by its printed output"
    code, expected = match.groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(doc), "exec"), {"__name__": "docs_example"})
    return out.getvalue(), expected
