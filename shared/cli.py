"""What the three commands share: logging set-up and turning user errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from shared.errors import UserError

Handler = Callable[[argparse.Namespace], int]
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
"""Every fedpath process's log lines (the commands, the site's task runner and ClientApp)."""


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, call the chosen sub-command's handler, map user errors to exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished work is kept, run the command again to resume", file=sys.stderr)
        return 130


def whole_number(minimum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number, at least ``minimum`` when given (``--last -2`` or 0 hospitals
    would do something else than asked, or fail later in a traceback that names no option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return parse


def add_command(subparsers, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    sub = subparsers.add_parser(name, help=help, description=help)
    sub.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub.set_defaults(handler=handler)
    return sub
