"""Writing files so that a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` on success.

    The parent folders are created. On any error the temporary file is removed and
    an existing ``path`` is left as it was. The temporary file is created with the
    default mode, so the result gets the permissions of any new file (``mkstemp``
    would make it private).

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the folder cannot be created or written.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, "it is a directory; give a file name", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        break
    try:
        yield temporary
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh folder beside ``path``; it replaces ``path`` as a whole on success.

    On any error the new folder is removed and an existing ``path`` is left as it
    was. Replacing an existing folder renames it aside first, so readers see the old
    folder or the new one.

    Raises:
        NotADirectoryError: ``path`` exists and is a file.
        OSError: the folder cannot be created.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(20, "it is a file; give a folder", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    temporary.mkdir()
    try:
        yield temporary
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
            target.rename(old)
            temporary.rename(target)
            shutil.rmtree(old)
        else:
            temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
