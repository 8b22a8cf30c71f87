"""Subcommands of the `medha` CLI."""

from __future__ import annotations

from medha.commands import calibrate, demo, generate, simulate, worker

COMMANDS = [generate, demo, simulate, calibrate, worker]
