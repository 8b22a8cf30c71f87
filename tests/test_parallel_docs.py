"""docs/parallelism.md: its example runs as written (as a script: workers are spawned and
re-import it) and prints the tokens one process computes."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medha import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "parallelism.md"


@pytest.mark.slow
def test_the_parallelism_example_runs_and_matches_one_process(tmp_path: Path) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert code, "the page lost its example"
    script = tmp_path / "example.py"
    script.write_text(code.group(1), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = ast.literal_eval(done.stdout.strip().splitlines()[-1])

    from medha.model.setup import build_runner
    from medha.model.single import generate_single

    runner, tokenizer = build_runner("tiny-random", num_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = [t.token_id for t in generate_single(runner, list(range(3, 103)), params, tokenizer)]
    assert tokens == alone


def test_the_layout_picture_matches_the_rank_layout() -> None:
    from medha.parallel.layout import RankLayout

    layout = RankLayout(tp=2, pp=2, kvp=2)
    text = DOC.read_text(encoding="utf-8")
    for kind, groups in (
        ("TP", layout.all_tp_groups()),
        ("KVP", layout.all_kvp_groups()),
        ("PP", layout.all_pp_groups()),
    ):
        pictured = " ".join("{" + ",".join(map(str, g)) + "}" for g in sorted(groups))
        assert f"{kind} groups: {pictured}" in re.sub(r"\s+", " ", text)
    assert f"the sampler: rank {layout.sampler_rank}" in text
