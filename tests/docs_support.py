"""Runs a docs page's example: its ```python block, followed by "prints ..." and the ```text
block of what it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

# The code may not contain a fence: a block with no "prints" after it never starts a match.
_EXAMPLE = re.compile(r"```python\n((?:(?!```).)*)```\n\nprints[^\n]*\n\n```text\n(.*?)```", re.S)


def run_documented_example(doc: Path) -> tuple[str, str]:
    """(what the page's first example prints when run, what the page says it prints)."""
    match = _EXAMPLE.search(doc.read_text(encoding="utf-8"))
    assert match, f"{doc.name}: no example block followed by its printed output"
    return _run(*match.groups())


def run_documented_examples(doc: Path) -> list[tuple[str, str]]:
    """`run_documented_example` for every example on the page, in order."""
    matches = _EXAMPLE.findall(doc.read_text(encoding="utf-8"))
    assert matches, f"{doc.name}: no example block followed by its printed output"
    return [_run(code, expected) for code, expected in matches]


def _run(code: str, expected: str) -> tuple[str, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})
    return out.getvalue(), expected
