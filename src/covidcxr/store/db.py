"""Opening the store: database engine (SQLite or PostgreSQL), migrations, blobs."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from covidcxr import config
from covidcxr.errors import MissingExtraError, StoreError
from covidcxr.store.blobs import BlobStore
from covidcxr.store.tables import Base

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


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


def create_store_engine(url: str) -> Engine:
    """Create an engine with foreign keys enforced on every backend."""
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
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
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
    """Bring the database schema to the newest migration (no-op when current)."""
    from alembic import command

    with engine.begin() as connection:
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
) -> Store:
    """Open (and by default create or upgrade) the store.

    Args:
        url: database URL or SQLite path; default from ``COVIDCXR_DB`` or a SQLite
            file in the data directory.
        data_dir: data directory for blobs and reports; default from
            ``COVIDCXR_DATA_DIR`` or the user's data directory.
        migrate: apply pending migrations; when False, a database that is not at
            the newest revision is refused.

    Raises:
        StoreError: the database cannot be reached or is at another revision.
    """
    directory = config.data_dir(data_dir)
    engine = create_store_engine(config.database_url(url, directory))
    try:
        if migrate:
            upgrade(engine)
        else:
            with engine.connect() as connection:
                revision = current_revision(connection)
            if revision != head_revision():
                raise StoreError(
                    f"open_store: database {engine.url.render_as_string(hide_password=True)} "
                    f"is at schema revision {revision}, this covidcxr needs {head_revision()}; "
                    "run any covidcxr command that writes (e.g. ingest) to upgrade it"
                )
    except OperationalError as exc:
        engine.dispose()
        raise StoreError(
            f"open_store: cannot open {engine.url.render_as_string(hide_password=True)}: {exc.orig}"
        ) from exc
    return Store(engine, directory)


def table_names(engine: Engine) -> list[str]:
    """Names of the tables in the database (for checks and tests)."""
    return sorted(inspect(engine).get_table_names())
