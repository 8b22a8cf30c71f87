"""Reading a CSV file the user hands the simulator, with one kind of error for what can go
wrong underneath: the file missing or unreadable, not UTF-8, or not CSV."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def csv_rows(path: Path, error: type[Exception], what: str) -> Iterator[csv.DictReader[str]]:
    """The rows of `path` by header; OSError, undecodable bytes and csv.Error raise `error`
    naming the file (`what` it is: "trace", "workload CSV")."""
    try:
        # utf-8-sig: a spreadsheet's export starts with a byte-order mark, which is no column.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield csv.DictReader(handle)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:  # a field over the csv module's size limit, a stray NUL
        raise error(f"{path}: not a readable CSV file ({exc})") from None
