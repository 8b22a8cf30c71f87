"""Subcommands of the `medha` CLI."""

from __future__ import annotations

from medha.commands import generate

COMMANDS = [generate]
