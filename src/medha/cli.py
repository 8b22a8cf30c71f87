"""The `medha` command: one subcommand per module of medha.commands.

Each module exposes `add_parser(subparsers)` and sets `func` on its parser; heavy imports
(torch, transformers) happen inside `func`, so `medha --help` stays instant. An error the user
can fix (medha.commands.user_errors) ends the command with one `medha: error: ...` line and exit
status 2, like a bad argument; -v adds its traceback. Any other error is a bug and shows one.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from medha.commands import COMMANDS
from medha.commands.user_errors import user_error_message
from medha.log import configure_cli_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medha",
        description="Long-context LLM serving that stays responsive for short requests.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    for subparser in subparsers.choices.values():
        # Also after the command (`medha generate ... -v`). Its own dest: argparse copies a
        # subcommand's values over the main parser's, which would drop a -v given before it.
        subparser.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=0,
            dest="verbose_after_command",
            help="log more (-v info, -vv debug)",
        )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with `verbose` counting every -v, before and after the command."""
    args = build_parser().parse_args(argv)
    args.verbose += args.verbose_after_command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as raised:
        # A task group (the demo's requests) wraps one task's error in an ExceptionGroup.
        exc: BaseException = raised
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        message = user_error_message(exc)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"medha: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
