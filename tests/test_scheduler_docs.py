"""The runnable example in docs/scheduler.md runs and shows what the text claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "scheduler.md"


def test_the_documented_example_runs_and_meets_every_short_deadline() -> None:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    printed = output.getvalue()
    assert "short deadlines met: 10 of 10" in printed
    first, last = map(int, re.findall(r"first (\d+), last full (\d+)", printed)[0])
    assert first > 2000 and last < 500
