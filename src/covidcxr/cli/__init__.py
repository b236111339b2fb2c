"""The ``covidcxr`` command line: a thin shell over the library.

Each command group lives in its own module and registers its subcommands with
:func:`build_parser`; :func:`main` is testable in-process
(``main(["list", "--format", "json"])``) and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from covidcxr import __version__
from covidcxr.cli import collection, dataset, evaluate, export, models, predict
from covidcxr.errors import CovidCxrError

log = logging.getLogger("covidcxr")

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="covidcxr",
        description="Toolkit for the COVID-19 chest imaging data collection. "
        "Research use only, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"covidcxr {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    collection.register(subparsers)
    export.register(subparsers)
    dataset.register(subparsers)
    models.register(subparsers)
    predict.register(subparsers)
    evaluate.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed check, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.handler(args))
    except CovidCxrError as exc:
        print(f"covidcxr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"covidcxr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
