"""Alembic environment: runs migrations on the connection covidcxr hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from covidcxr.store.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    """Run on ``config.attributes["connection"]``, or on ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if url is None:
            raise RuntimeError("alembic: pass a connection or set sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as own_connection:
            context.configure(
                connection=own_connection,
                target_metadata=target_metadata,
                render_as_batch=True,
            )
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run_migrations()
