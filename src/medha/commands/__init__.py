"""Subcommands of the `medha` CLI."""

from __future__ import annotations

from medha.commands import calibrate, demo, generate, simulate

COMMANDS = [generate, demo, simulate, calibrate]
