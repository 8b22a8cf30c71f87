"""Subcommands of the `medha` CLI."""

from __future__ import annotations

from medha.commands import calibrate, demo, generate, serve, simulate, worker

COMMANDS = [generate, serve, demo, simulate, calibrate, worker]
