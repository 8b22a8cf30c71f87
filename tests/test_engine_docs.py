"""docs/engine.md's online time scale example runs as written and prints the learned factor."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def test_the_time_scale_example_runs_and_prints_the_factor() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (code,) = [block for block in blocks if "time_scale" in block]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    assert re.fullmatch(r"iterations run \d+\.\d\dx the calibrated time\n", out.getvalue())
