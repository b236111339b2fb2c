"""``covidcxr info``: which store and data directory are in use, and what they hold."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from covidcxr import __version__, config
from covidcxr.cli.output import write_mapping

EXIT_NO_STORE = 3


def folder_size(path: Path) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n_bytes: int) -> str:
    """``1536`` -> ``1.5 kB``: sizes for people (powers of 1000)."""
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def _models() -> dict[str, Any]:
    from covidcxr.errors import MetadataError
    from covidcxr.models.bundle import SHIPPED_DIR, default_model_id, list_bundles

    try:
        default = default_model_id()
    except MetadataError:
        default = None
    models: dict[str, Any] = {"default": default}
    for bundle in list_bundles():
        where = "shipped" if bundle.path.parent == SHIPPED_DIR else str(bundle.path)
        models[bundle.model_id] = where
    return models


def _store_contents(url: str) -> dict[str, Any]:
    from covidcxr.store import queries
    from covidcxr.store.db import create_store_engine, current_revision, head_revision

    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
            contents: dict[str, Any] = {
                "schema_revision": revision,
                "schema_revision_needed": head_revision(),
            }
            if revision != head_revision():
                contents["note"] = "run `covidcxr ingest` to upgrade the schema"
                return contents
            counts = queries.stats(conn)
    finally:
        engine.dispose()
    contents.update(
        records=counts["records"],
        patients=counts["patients"],
        images=counts["images"],
        sources=counts["sources"] or "none: the store is empty; run `covidcxr ingest SOURCE`",
    )
    return contents


def gather(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """What ``info`` prints, and whether the store exists."""
    directory = config.data_dir(args.data_dir)
    url = config.database_url(args.db, directory)
    shown_url = make_url(url).render_as_string(hide_password=True)
    database = sqlite_file(url)
    exists = database is None or database.is_file()
    cache = directory / "cache"
    data: dict[str, Any] = {
        "covidcxr": __version__,
        "data_dir": {
            "path": str(directory),
            "from": config.data_dir_origin(args.data_dir),
            "exists": directory.is_dir(),
            "size": human_size(folder_size(directory)),
        },
        "store": {
            "url": shown_url,
            "from": config.database_url_origin(args.db),
            "exists": exists,
        },
        "blobs": {
            "path": str(directory / "blobs"),
            "size": human_size(folder_size(directory / "blobs")),
        },
        "reports": str(directory / "reports"),
        "cache": {
            "path": str(cache),
            "folders": sorted(p.name for p in cache.iterdir()) if cache.is_dir() else [],
            "size": human_size(folder_size(cache)),
        },
        "models": _models(),
    }
    if database is not None:
        data["store"]["size"] = human_size(folder_size(database))
    if exists:
        data["store"].update(_store_contents(url))
    return data, exists


def _hint_local_store(directory: Path) -> None:
    """Name ``./data`` when it holds a store (what older ``scripts/run.sh`` wrote)."""
    local = Path("data")
    if (local / config.DB_FILENAME).is_file() and local.resolve() != directory.resolve():
        print(
            f"covidcxr info: ./data holds a store: use it with --data-dir data or "
            f"{config.DATA_DIR_ENV}=$PWD/data",
            file=sys.stderr,
        )


def cmd_info(args: argparse.Namespace) -> int:
    """covidcxr info: exit 3 when the store does not exist (after saying where it looked)."""
    if args.where:
        print(config.data_dir(args.data_dir))
        return 0
    data, exists = gather(args)
    write_mapping(data, args.format)
    if not exists:
        print(
            f"covidcxr info: no store at {data['store']['url']} "
            f"(database from {data['store']['from']}, data directory from "
            f"{data['data_dir']['from']}); create one with `covidcxr ingest SOURCE`, or "
            f"point --data-dir / ${config.DATA_DIR_ENV} at the folder an earlier run used",
            file=sys.stderr,
        )
        _hint_local_store(Path(data["data_dir"]["path"]))
        return EXIT_NO_STORE
    return 0


def register(subparsers: Any) -> None:
    """Add ``info``."""
    from covidcxr.cli.collection import add_store_options

    info = subparsers.add_parser(
        "info",
        help="which store and data directory are in use, and what they hold",
        description="Print the store URL and data directory in use and why (flag, "
        "environment or default), their sizes, the sources with record counts, the "
        "schema revision, the models and the cache folders. The first thing to run when "
        "something looks empty. Exit 3 when the store does not exist.",
    )
    add_store_options(info)
    info.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    info.add_argument(
        "--where", action="store_true", help="print only the data directory (for scripts)"
    )
    info.set_defaults(handler=cmd_info)
