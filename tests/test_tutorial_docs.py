"""docs/tutorial-deadlines.md: its example runs as written and reports both requests."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tutorial-deadlines.md"


def test_the_tutorial_example_runs_and_reports_each_request() -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert code, "the tutorial lost its example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.group(1), str(DOC), "exec"), {"__name__": "docs_example"})
    lines = sorted(out.getvalue().splitlines())
    assert [line.split(":")[0] for line in lines] == ["long", "short"]
    short = lines[1]
    assert re.fullmatch(r"short: ttft \d+\.\d{3} s, deadline 0\.50 s, met (True|False)", short)


def test_the_tutorial_images_exist() -> None:
    for name in re.findall(r"\]\((images/[^)]+)\)", DOC.read_text(encoding="utf-8")):
        assert (ROOT / "docs" / name).is_file(), name
