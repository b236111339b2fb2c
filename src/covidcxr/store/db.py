"""Opening the store: database engine (SQLite or PostgreSQL), migrations, blobs."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, OperationalError

from covidcxr import config
from covidcxr.errors import MissingExtraError, StoreError
from covidcxr.store.blobs import BlobStore
from covidcxr.store.tables import Base

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock key held while the schema is created or upgraded.
_MIGRATION_LOCK = 0x636F7669_64637872 & 0x7FFFFFFFFFFFFFFF
#: A table every covidcxr store has, whatever its revision.
_MARKER_TABLE = "alembic_version"


def normalise_url(url: str) -> str:
    """Pick an installed driver for ``postgresql://`` URLs (psycopg 3).

    Raises:
        StoreError: the URL is not a database URL SQLAlchemy understands.
        MissingExtraError: PostgreSQL is asked for but no driver is installed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"open_store: {url!r} is not a database URL: {exc}") from exc
    if parsed.drivername == "postgresql":
        if importlib.util.find_spec("psycopg") is not None:
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif importlib.util.find_spec("psycopg2") is None:
            raise MissingExtraError("psycopg", "postgres")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; the schema relies on them.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_store_engine(url: str, *, create: bool = True) -> Engine:
    """Create an engine with foreign keys enforced on every backend.

    Args:
        url: the database URL.
        create: make the SQLite file's folder when missing (else leave it absent).
    """
    url = normalise_url(url)
    try:
        engine = create_engine(url)
    except (NoSuchModuleError, ArgumentError) as exc:
        raise StoreError(
            f"open_store: cannot use {make_url(url).render_as_string(hide_password=True)}: "
            f"{exc}; use sqlite:///FILE or postgresql://USER@HOST/DB"
        ) from exc
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if create and database and database != ":memory:":
            try:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"open_store: cannot create the folder of {Path(database).resolve()} "
                    f"({exc.strerror or exc}); pass --db or --data-dir somewhere writable"
                ) from exc
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic config pointing at the packaged migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def current_revision(connection: Connection) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration shipped with this version of covidcxr."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return str(head)


def upgrade(engine: Engine) -> None:
    """Bring the database schema to the newest migration (no-op when current).

    Safe when several processes open a new database together: they take the
    database's write lock (SQLite) or an advisory lock (PostgreSQL) before looking at
    the revision, so one migrates and the others then find the schema current.
    """
    from alembic import command

    with engine.connect() as connection:
        if current_revision(connection) == head_revision():
            return
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction unless one is begun explicitly.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        if current_revision(connection) == head_revision():
            return
        log.info("upgrading database schema to %s", head_revision())
        command.upgrade(alembic_config(connection), "head")


class Store:
    """The metadata database plus the blob directory.

    Attributes:
        url: the SQLAlchemy URL (password hidden when printed).
        engine: the SQLAlchemy engine.
        data_dir: where blobs and reports live.
        blobs: content-addressed image files.
    """

    def __init__(self, engine: Engine, data_dir: Path) -> None:
        """Wrap an engine and data directory; use :func:`open_store` instead."""
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self.data_dir = data_dir
        self.blobs = BlobStore(data_dir / "blobs")

    @property
    def reports_dir(self) -> Path:
        """Where ingest reports are written."""
        return self.data_dir / "reports"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection inside one transaction: committed on success, else rolled back."""
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for queries."""
        with self.engine.connect() as connection:
            yield connection

    def analyze(self) -> None:
        """Refresh the database's planner statistics.

        Run after an ingest. On PostgreSQL this is ``VACUUM (ANALYZE)`` of covidcxr's
        own tables: it also marks the freshly written pages all-visible, so that counts
        can read indexes alone instead of the tables behind them.
        """
        if self.engine.dialect.name == "postgresql":
            tables = ", ".join(
                self.engine.dialect.identifier_preparer.quote(table.name)
                for table in Base.metadata.sorted_tables
            )
            # VACUUM cannot run inside a transaction.
            autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            with autocommit.connect() as connection:
                connection.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
            return
        with self.engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    url: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    migrate: bool = True,
    create: bool = False,
) -> Store:
    """Open (and by default upgrade) the store; only ``create`` makes a new one.

    Args:
        url: database URL or SQLite path; default from ``COVIDCXR_DB`` or a SQLite
            file in the data directory.
        data_dir: data directory for blobs and reports; default from
            ``COVIDCXR_DATA_DIR`` or the user's data directory.
        migrate: apply pending migrations; when False, a database that is not at
            the newest revision is refused.
        create: create the database (and its folder) and schema when absent. Reading
            commands leave it False: a store that does not exist is refused and
            nothing is created.

    Raises:
        StoreError: the database does not exist (and ``create`` is False), cannot be
            reached, is damaged, or is at another revision; the data directory is a
            file.
    """
    directory = config.data_dir(data_dir)
    if directory.exists() and not directory.is_dir():
        raise StoreError(
            f"open_store: the data directory {directory.resolve()} is a file, not a folder; "
            "pass --data-dir DIR (or set COVIDCXR_DATA_DIR) to a folder"
        )
    engine = create_store_engine(config.database_url(url, directory), create=create)
    shown = _location(engine)
    try:
        if not create:
            _require_existing(engine, shown)
        if migrate:
            upgrade(engine)
        else:
            with engine.connect() as connection:
                revision = current_revision(connection)
            if revision != head_revision():
                raise StoreError(
                    f"open_store: database {shown} is at schema revision {revision}, this "
                    f"covidcxr needs {head_revision()}; run any covidcxr command that writes "
                    "(e.g. ingest) to upgrade it"
                )
    except StoreError:
        engine.dispose()
        raise
    except OperationalError as exc:
        engine.dispose()
        raise StoreError(f"open_store: cannot open {shown}: {exc.orig}") from exc
    except DatabaseError as exc:
        engine.dispose()
        raise StoreError(
            f"open_store: {shown} is damaged or not a covidcxr database ({exc.orig}); "
            "restore it from a backup, or pass --db to another database"
        ) from exc
    return Store(engine, directory)


def _location(engine: Engine) -> str:
    """The database as a user should see it: an absolute path for SQLite."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        return str(Path(database).resolve())
    return engine.url.render_as_string(hide_password=True)


def _require_existing(engine: Engine, shown: str) -> None:
    """Refuse, creating nothing, a database that does not exist or holds no store."""
    database = engine.url.database
    missing = f"open_store: no covidcxr store at {shown}"
    fix = (
        "; run `covidcxr ingest SOURCE` to create one, or pass --db/--data-dir "
        "(or set COVIDCXR_DATA_DIR) to an existing store"
    )
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        if not Path(database).is_file():
            raise StoreError(missing + fix)
        # Opened read-only so that the check itself can never create or change it.
        uri = f"file:{Path(database).resolve()}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
                found = connection.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                    (_MARKER_TABLE,),
                ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"open_store: {shown} is damaged or not a covidcxr database ({exc}); "
                "restore it from a backup, or pass --db to another database"
            ) from exc
        if found is None:
            raise StoreError(missing + " (the file holds no covidcxr tables)" + fix)
        return
    with engine.connect() as connection:
        if not inspect(connection).has_table(_MARKER_TABLE):
            raise StoreError(missing + " (the database holds no covidcxr tables)" + fix)


def table_names(engine: Engine) -> list[str]:
    """Names of the tables in the database (for checks and tests)."""
    return sorted(inspect(engine).get_table_names())
