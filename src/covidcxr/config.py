"""Where covidcxr keeps its data: database URL and data directory.

One rule, from any working directory: an explicit argument (``--db``/``--data-dir``),
then the environment (``COVIDCXR_DB``, ``COVIDCXR_DATA_DIR``), then the user's data
directory (``platformdirs.user_data_dir("covidcxr")``, ``~/.local/share/covidcxr`` on
Linux). ``covidcxr info`` prints which one is in use and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

DB_ENV = "COVIDCXR_DB"
DATA_DIR_ENV = "COVIDCXR_DATA_DIR"
DB_FILENAME = "covidcxr.sqlite"


def default_data_dir() -> Path:
    """The data directory used when neither ``--data-dir`` nor the environment names one."""
    return Path(platformdirs.user_data_dir("covidcxr", appauthor=False))


def data_dir_origin(explicit: str | os.PathLike[str] | None = None) -> str:
    """Why :func:`data_dir` returns what it does: ``--data-dir``, the variable, or default."""
    if explicit is not None:
        return "--data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return f"${DATA_DIR_ENV}"
    return "default (the user data directory)"


def database_url_origin(explicit: str | None = None) -> str:
    """Why :func:`database_url` returns what it does: ``--db``, the variable, or default."""
    if explicit:
        return "--db"
    if os.environ.get(DB_ENV):
        return f"${DB_ENV}"
    return f"default ({DB_FILENAME} in the data directory)"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory (not created here).

    Args:
        explicit: a directory given by the user; wins over the environment.
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_data_dir()


def database_url(
    explicit: str | None = None, data_directory: str | os.PathLike[str] | None = None
) -> str:
    """Return the SQLAlchemy URL of the store.

    A bare filesystem path is accepted and read as a SQLite file.

    Args:
        explicit: a URL (``sqlite:///x.db``, ``postgresql://...``) or a path.
        data_directory: used for the default SQLite file when no URL is given.
    """
    url = explicit or os.environ.get(DB_ENV)
    if not url:
        return f"sqlite:///{data_dir(data_directory) / DB_FILENAME}"
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url
