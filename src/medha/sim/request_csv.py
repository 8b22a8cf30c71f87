"""A user's workload as CSV: one request per row.

    arrival_time,prompt_tokens,output_tokens,deadline,label
    0.0,1200,200,,chat
    0.4,450000,500,120,document

Required columns: arrival_time (seconds, >= 0), prompt_tokens (>= 1), output_tokens (>= 1).
Optional: deadline (TTFT deadline in seconds after arrival, > 0; empty: the scheduler's default
rule) and label (metrics are also reported per label; default "csv"). Any other column is an
error, so that a misspelt optional column is not silently ignored. Rows need not be sorted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from medha.sim.csv_file import csv_rows
from medha.sim.workload import SimRequest, WorkloadError

REQUIRED_COLUMNS = ("arrival_time", "prompt_tokens", "output_tokens")
OPTIONAL_COLUMNS = ("deadline", "label")


def read_requests_csv(path: str | Path) -> list[SimRequest]:
    """The requests of a workload CSV, sorted by arrival. Raises WorkloadError naming the file,
    the line and the problem."""
    path = Path(path)
    with csv_rows(path, WorkloadError, "workload CSV") as reader:
        _check_header(path, reader.fieldnames)
        # line_num, not a row count: blank lines are skipped, a quoted field spans lines.
        requests = [_parse_row(path, reader.line_num, row) for row in reader]
    if not requests:
        raise WorkloadError(f"{path}: no requests (only a header)")
    return sorted(requests, key=lambda request: request.arrival)


def _check_header(path: Path, fieldnames: Sequence[str] | None) -> None:
    if not fieldnames:
        raise WorkloadError(f"{path}: empty file; expected a header {','.join(REQUIRED_COLUMNS)}")
    columns = [name.strip() for name in fieldnames]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise WorkloadError(f"{path}: column(s) {', '.join(repeated)} given twice in the header")
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    unknown = [name for name in columns if name not in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        raise WorkloadError(
            f"{path}: {'; '.join(problems)} (required: {', '.join(REQUIRED_COLUMNS)}; "
            f"optional: {', '.join(OPTIONAL_COLUMNS)})"
        )


def _parse_row(path: Path, line: int, row: dict[str, str | None]) -> SimRequest:
    if None in row:  # csv puts surplus fields under the key None
        raise WorkloadError(f"{path}:{line}: more fields than columns in the header")
    values = {(key or "").strip(): (value or "").strip() for key, value in row.items()}

    def number(column: str, kind: type[int] | type[float], minimum: float, strict: bool) -> float:
        text = values.get(column, "")
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise WorkloadError(
                f"{path}:{line}: {column} must be {expected}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise WorkloadError(f"{path}:{line}: {column} must be {bound}, got {text!r}")
        return value

    deadline = None
    if values.get("deadline"):
        deadline = number("deadline", float, 0.0, strict=True)
    return SimRequest(
        request_id=f"csv{line - 1:05d}",
        arrival=number("arrival_time", float, 0.0, strict=False),
        prompt_tokens=int(number("prompt_tokens", int, 1, strict=False)),
        output_tokens=int(number("output_tokens", int, 1, strict=False)),
        deadline=deadline,
        label=values.get("label") or "csv",
    )
