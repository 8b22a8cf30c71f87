"""Where medha keeps what it derives from model files, and how it writes there safely.

Derived folders (a GGUF converted to safetensors, the built `tiny-random` preset) are written into
a temporary sibling folder and renamed into place in one step, so a crash or a concurrent build
never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medha.log import get_logger

log = get_logger(__name__)


def default_cache_dir() -> Path:
    """`$MEDHA_CACHE_DIR`, else `$XDG_CACHE_HOME/medha`, else `~/.cache/medha`."""
    if explicit := os.environ.get("MEDHA_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "medha"
    return Path.home() / ".cache" / "medha"


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `final` when the block exits cleanly.

    On an exception the temporary folder is deleted and `final` is left untouched. If another
    process published `final` first, its folder is kept and ours is discarded: both were built
    from the same inputs.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent folder, so the final rename never crosses a file system (it stays atomic).
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("cache folder built concurrently; keeping the other copy", path=str(final))
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
