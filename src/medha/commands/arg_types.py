"""Argument types and help text the subcommands share.

A value argparse refuses is reported as a usage error (exit status 2) before anything is loaded,
rather than minutes later, deep inside a calibration or a model load.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a time budget, a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of blocks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (a share of the requests)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def output_path(text: str) -> Path:
    """argparse type: a path to write to (not ""; whether it can be written is checked when
    the command starts, before its work)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def policy_list(text: str) -> list[str]:
    """argparse type: comma-separated scheduling policies, each one medha has."""
    from medha.scheduler import POLICY_NAMES

    # Each once: a policy named twice would run twice for one row of results.
    policies = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        problem = f"unknown policy {', '.join(unknown)}" if unknown else "no policy given"
        raise argparse.ArgumentTypeError(f"{problem} (choose from {', '.join(POLICY_NAMES)})")
    return policies


def doc_paragraph(doc: str | None, index: int) -> str | None:
    """Paragraph `index` of a module docstring as one line, for a parser's description.

    Whole paragraphs, not lines: a docstring wraps its sentences at 100 columns, and argparse
    rewraps the description to the terminal anyway.
    """
    paragraphs = (doc or "").strip().split("\n\n")
    return " ".join(paragraphs[index].split()) if index < len(paragraphs) else None
