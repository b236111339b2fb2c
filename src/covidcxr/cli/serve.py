"""``covidcxr serve`` (the web service) and ``covidcxr users`` (its accounts)."""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from covidcxr.cli.collection import add_store_options
from covidcxr.cli.output import positive_int
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.store import accounts
from covidcxr.store.db import open_store

ROLES = accounts.ROLES


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``users`` to the command line."""
    serve = subparsers.add_parser(
        "serve",
        help="the second-opinion web app and REST API (research use only, not a diagnosis)",
        description="Serve the web app (upload X-rays, browse the store, contribute cases) "
        "and the REST API (/api/v1, docs at /docs) with uvicorn.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_store_options(serve)
    serve.add_argument("--model", metavar="ID|PATH", help="model (default: the shipped one)")
    serve.add_argument(
        "--workers", type=positive_int, default=1, metavar="N", help="uvicorn worker processes"
    )
    serve.add_argument(
        "--predict-threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="predictions run at once per worker (default: 1)",
    )
    serve.add_argument(
        "--inference-threads",
        type=positive_int,
        metavar="N",
        help="CPU threads of the network (default: the engine's choice)",
    )
    serve.add_argument(
        "--predict-per-minute",
        type=positive_int,
        default=60,
        metavar="N",
        help="predict requests per client per minute; more get 429 (default: 60)",
    )
    serve.add_argument("--private", action="store_true", help="reading the store needs an account")
    serve.add_argument(
        "--ingest",
        metavar="SOURCE_DIR",
        help="when the store holds no records yet, ingest this source first "
        "(e.g. ../shared/datasets/covid-chestxray)",
    )
    serve.set_defaults(handler=cmd_serve)

    users = subparsers.add_parser("users", help="accounts of the web service")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a user; prints an API token once")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument(
        "--password",
        action="store_true",
        help="also set a password for the web pages (asked for, or read from stdin)",
    )
    add_store_options(add)
    add.set_defaults(handler=cmd_users_add)
    remove = actions.add_parser("delete", help="delete a user and their tokens")
    remove.add_argument("name")
    add_store_options(remove)
    remove.set_defaults(handler=cmd_users_delete)


def _secret(data_dir: Path) -> str:
    """The signing key shared by every worker, kept in the data directory (mode 600)."""
    path = data_dir / "serve-secret"
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def _ingest_on_first_use(store: Any, source: str) -> None:
    from covidcxr.ingest.pipeline import ingest_source
    from covidcxr.store import queries

    with store.read() as conn:
        if queries.count_records(conn) > 0:
            return
    print(f"covidcxr serve: empty store; ingesting {source} first", file=sys.stderr)
    outcome = ingest_source(source, store)
    store.analyze()
    print(f"covidcxr serve: ingested; report {outcome.report_json}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    """covidcxr serve: run uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("uvicorn", "serve") from exc
    from covidcxr import config

    data_dir = config.data_dir(args.data_dir)
    # Upgrade once, before the workers; only --ingest may create a store.
    with open_store(args.db, data_dir, create=bool(args.ingest)) as store:
        if args.ingest:
            _ingest_on_first_use(store, args.ingest)
    env = {
        "COVIDCXR_SERVE_DB": args.db or "",
        "COVIDCXR_SERVE_DATA_DIR": str(data_dir),
        "COVIDCXR_SERVE_MODEL": args.model or "",
        "COVIDCXR_SERVE_THREADS": str(args.predict_threads),
        "COVIDCXR_SERVE_PRIVATE": "1" if args.private else "",
        "COVIDCXR_SERVE_INFERENCE_THREADS": str(args.inference_threads or ""),
        "COVIDCXR_SERVE_PREDICT_PER_MINUTE": str(args.predict_per_minute),
        "COVIDCXR_SERVE_SECRET": _secret(data_dir),
    }
    os.environ.update(env)
    print(f"covidcxr serve: http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(
        "covidcxr.serve.app:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
    )
    return 0


def _store(args: argparse.Namespace, *, create: bool = False) -> Any:
    return open_store(args.db, args.data_dir, create=create)


def cmd_users_add(args: argparse.Namespace) -> int:
    """covidcxr users add: create the user and print the API token once."""
    password = None
    if args.password:
        password = (
            getpass.getpass(f"password for {args.name}: ")
            if sys.stdin.isatty()
            else sys.stdin.readline().rstrip("\n")
        )
        if len(password) < 8:
            raise MetadataError("users add: the password needs at least 8 characters")
    with _store(args, create=True) as store, store.transaction() as conn:
        token = accounts.add_user(conn, args.name, args.role, password)
    print(f"user {args.name} ({args.role}) created. API token (shown once, keep it safe):")
    print(token)
    return 0


def cmd_users_delete(args: argparse.Namespace) -> int:
    """covidcxr users delete: remove the user; their tokens stop working at once."""
    with _store(args) as store, store.transaction() as conn:
        accounts.delete_user(conn, args.name)
    print(f"user {args.name} deleted")
    return 0
