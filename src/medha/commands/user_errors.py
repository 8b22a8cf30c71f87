"""Which errors are the user's to fix, and their one-line messages.

`medha` prints those as `medha: error: ...` and exits with status 2, as argparse does for a bad
argument; anything else is a bug in medha and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from medha.errors import MedhaError, ModelLoadError

if TYPE_CHECKING:
    from pydantic import ValidationError


class UsageError(Exception):
    """A command-line mistake found after parsing, such as an output path that cannot be
    written."""


def user_error_message(exc: BaseException) -> str | None:
    """The message of an error the user can fix: bad input or config (medha's ValueErrors and
    pydantic's ValidationError), a model that does not load, an unusable output path. None for
    any other error."""
    from pydantic import ValidationError

    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return _validation_message(exc)
    # EngineFailedError and EngineClosedError are MedhaErrors too, but not the user's doing.
    if isinstance(exc, MedhaError) and isinstance(exc, ValueError | ModelLoadError):
        return str(exc)
    return None


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return f"invalid {exc.title}: {'; '.join(problems)}"


def prepare_output_dir(folder: Path) -> Path:
    """Create `folder` (and its parents) now, before the work whose results go there, or raise a
    UsageError saying why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder {folder}: {exc.strerror or exc}") from exc
    return folder


def check_output_file(path: Path) -> Path:
    """Check that `path` can be written, creating its folder, before the work that fills it
    (without creating the file: a run that fails leaves no empty file behind)."""
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    folder = prepare_output_dir(path.parent)
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied")
    return path
