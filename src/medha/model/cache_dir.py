"""Where medha keeps what it derives from model files, and how it writes there safely.

Derived folders (a GGUF converted to safetensors, the built `tiny-random` preset) are written into
a temporary sibling folder and renamed into place in one step, so a crash or a concurrent build
never leaves a half-written folder under the final name. A failure to write there (a full disk,
a read-only or misnamed cache folder) is a ModelLoadError naming the cache folder, not a bare
OSError from deep inside the build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from medha.errors import ModelLoadError
from medha.log import get_logger

log = get_logger(__name__)


def default_cache_dir() -> Path:
    """`$MEDHA_CACHE_DIR`, else `$XDG_CACHE_HOME/medha`, else `~/.cache/medha`."""
    if explicit := os.environ.get("MEDHA_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "medha"
    return Path.home() / ".cache" / "medha"


STALE_STAGING_SECONDS = 24 * 3600
"""A staging folder this old is a build that was killed (SIGKILL, a power cut): removed."""


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` when the block exits cleanly.

    On an exception the temporary folder is deleted and `final` is left untouched. If another
    process published `final` first, its folder is kept and ours is discarded: both were built
    from the same inputs. The published folder is readable by every user (a cache built as
    root in a container image serves the unprivileged user who runs it).
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(final.parent)
        # Same parent folder, so the final rename never crosses a file system (it stays atomic).
        staging = Path(
            tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        )
    except OSError as exc:
        raise _cache_error(final, exc) from exc
    try:
        yield staging
        _readable_by_all(staging)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("cache folder built concurrently; keeping the other copy", path=str(final))
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _is_write_failure(exc):
            raise _cache_error(final, exc) from exc
        raise


def _remove_stale_staging(parent: Path) -> None:
    now = time.time()
    for leftover in parent.glob(".*.partial"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
                log.info("removed a killed build's staging folder", path=str(leftover))


def _readable_by_all(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and some writers 0600 files: open them up as the umask
    allows, as a plain mkdir and open would have. Best effort: a file system without Unix
    modes (vfat, some network mounts) refuses chmod, and its cache still works."""
    umask = _umask()
    for path in (folder, *folder.rglob("*")):
        with contextlib.suppress(OSError):
            path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022  # what most systems default to; only the modes' strictness depends on it


def _is_write_failure(exc: BaseException) -> bool:
    # safetensors reports a full disk as its own SafetensorError, not as an OSError.
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def _cache_error(final: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        final,
        f"cannot write medha's cache there ({exc}); free some space, or set MEDHA_CACHE_DIR "
        "to a writable folder",
    )
