"""The ``covidcxr`` command line: a thin shell over the library.

Each command group lives in its own module and registers its subcommands with
:func:`build_parser`; :func:`main` is testable in-process
(``main(["list", "--format", "json"])``) and returns the exit code.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from covidcxr import __version__
from covidcxr.cli import (
    collection,
    dataset,
    evaluate,
    export,
    info,
    lungs,
    models,
    predict,
    prognosis,
    report,
    serve,
    verify,
)
from covidcxr.errors import CovidCxrError, IngestRefusedError, StoreError
from covidcxr.ingest.report import escape_control

log = logging.getLogger("covidcxr")

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3

#: errno values of an environment the user must fix (not a bug, not bad input).
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
)
#: errno values of input the user named wrongly.
_INPUT_ERRNOS = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR})


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
    report.register(subparsers)
    serve.register(subparsers)
    prognosis.register(subparsers)
    info.register(subparsers)
    lungs.register(subparsers)
    verify.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0 ok, 1 check failed or findings, 2 usage or input error, 3 environment
    (read-only, disk full, corrupt or missing store, wrong data dir): an environment
    error is one line naming the path and what to do, never a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"covidcxr {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error becomes a message and an exit code
        message, code = describe_error(exc, args)
        if code is None:
            raise
        print(f"covidcxr {args.command}: error: {escape_control(message)}", file=sys.stderr)
        return code


def describe_error(exc: BaseException, args: argparse.Namespace) -> tuple[str, int | None]:
    """The one-line message and exit code of an error (code None: a bug, re-raised)."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, IngestRefusedError):
        return str(exc), EXIT_FAILED_CHECK
    if isinstance(exc, StoreError):
        return str(exc), EXIT_ENVIRONMENT
    if isinstance(exc, CovidCxrError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, DBAPIError):
        where = _store_location(args)
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        return (
            f"the store at {where} failed: {reason}; {_database_hint(reason)}; nothing was changed",
            EXIT_ENVIRONMENT,
        )
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS | _INPUT_ERRNOS:
        where = exc.filename if exc.filename is not None else _store_location(args)
        code = EXIT_ENVIRONMENT if exc.errno in _ENVIRONMENT_ERRNOS else EXIT_USAGE
        return (
            f"{where}: {exc.strerror or exc}; {_os_hint(exc.errno)}; the store is unchanged",
            code,
        )
    if isinstance(exc, MemoryError):
        return "out of memory; use fewer --workers or a machine with more memory", EXIT_ENVIRONMENT
    return "", None


def _store_location(args: argparse.Namespace) -> str:
    from covidcxr import config

    if not hasattr(args, "db"):
        return "the store"
    try:
        url = config.database_url(args.db, config.data_dir(args.data_dir))
    except Exception:  # only for the message
        return "the store"
    return url.removeprefix("sqlite:///")


def _database_hint(reason: str) -> str:
    lowered = reason.lower()
    if "readonly" in lowered or "read-only" in lowered:
        return "the database (or its folder) is read-only: make it writable or pass --db"
    if "full" in lowered or "no space" in lowered:
        return "the disk is full: free some space and run the command again"
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return "the database file is damaged: restore it from a backup or pass --db"
    if "locked" in lowered:
        return "another process holds the database: wait for it and run the command again"
    return "check the database and run the command again"


def _os_hint(code: int | None) -> str:
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return "the disk is full: free some space and run the command again"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "it is read-only or not permitted: make it writable or choose another path"
    if code in (errno.ENOTDIR, errno.EISDIR):
        return "a file stands where a folder should be (or the reverse): check --data-dir"
    return "check the path and run the command again"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
