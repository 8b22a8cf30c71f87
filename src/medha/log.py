"""Structured logging that behaves like a library's should.

medha's loggers are structlog loggers wrapped around the standard `logging` module, set up per
logger (no global structlog configuration is touched), so the embedding application decides
levels and handlers with plain `logging` config. Nothing below WARNING shows unless asked for:
`logging.getLogger("medha").setLevel(logging.INFO)` or `medha -v` on the command line.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,  # first: a disabled level costs one isEnabledFor call
    structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=False),
]


def get_logger(name: str) -> Any:
    """A structlog logger writing through `logging.getLogger(name)`."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )


def configure_cli_logging(verbosity: int) -> None:
    """For the `medha` command: messages to stderr; WARNING, or INFO with -v, DEBUG with -vv."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger("medha")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
