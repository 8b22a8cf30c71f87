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


def _run_example(index: int, tmp_path: Path) -> object:
    """Run the page's `index`-th Python example as a script; what its last line printed."""
    examples = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(examples) > index, "the page lost an example"
    script = tmp_path / "example.py"
    script.write_text(examples[index], encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def _alone(prompt: list[int]) -> list[int]:
    """One process's greedy tokens (8) for `prompt`, on tiny-random."""
    from medha.model.setup import build_runner
    from medha.model.single import generate_single

    runner, tokenizer = build_runner("tiny-random", num_blocks=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [t.token_id for t in generate_single(runner, prompt, params, tokenizer)]


@pytest.mark.slow
def test_the_parallelism_example_runs_and_matches_one_process(tmp_path: Path) -> None:
    assert _run_example(0, tmp_path) == _alone(list(range(3, 103)))


@pytest.mark.slow
def test_the_data_parallel_example_runs_and_matches_one_process(tmp_path: Path) -> None:
    expected = [_alone(list(range(3, 40))), _alone(list(range(50, 70)))]
    assert _run_example(1, tmp_path) == expected


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
