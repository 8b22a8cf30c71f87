"""`medha generate` streams a completion and reports bad input without a traceback."""

from __future__ import annotations

import pytest

from medha.cli import main


def test_generate_prints_the_greedy_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "tiny-random", "Hello world", "--max-tokens", "6"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "tiny-random", "Hello world", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == first  # greedy: deterministic
    assert first.endswith("\n") and len(first.strip()) > 0


def test_generate_with_chat_template_and_sampling_seed(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "generate",
        "tiny-random",
        "Hi",
        "--chat",
        "--temperature",
        "0.9",
        "--seed",
        "3",
        "--max-tokens",
        "5",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_reports_bad_sampling_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "tiny-random", "Hi", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_reports_a_missing_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "/no/such/model", "Hi"]) == 2
    assert "/no/such/model" in capsys.readouterr().err
