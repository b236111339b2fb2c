"""Content-addressed file storage: every image (and mask) is kept once, by sha256.

Layout: ``<root>/<sha[:2]>/<sha>``. Files are written through a temporary file
and renamed, so a crash never leaves a partial blob under its final name; an
ingest writes blobs before it commits, so a rolled-back ingest can leave unused
blobs but never a database row pointing at a missing file.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from covidcxr.errors import StoreError

_HEX = frozenset("0123456789abcdef")


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def blob_path(root: Path, sha256: str) -> Path:
    """Where the blob with this hash lives below ``root``: ``<root>/<sha[:2]>/<sha>``."""
    return root / sha256[:2] / sha256


class BlobStore:
    """Files named by the sha256 of their bytes below ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use ``root`` (created on first write)."""
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Where the blob with this hash lives (whether or not it exists)."""
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise StoreError(f"BlobStore.path: {sha256!r} is not a lowercase hex sha256")
        return blob_path(self.root, sha256)

    def has(self, sha256: str) -> bool:
        """True if the blob exists."""
        return self.path(sha256).is_file()

    def state(self, sha256: str, n_bytes: int | None = None) -> str:
        """``ok``, ``missing``, or ``damaged`` (not a regular file, or not ``n_bytes``
        long): a cheap check by ``stat`` alone; :meth:`verify` re-hashes."""
        try:
            info = self.path(sha256).stat()
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(info.st_mode) or (n_bytes is not None and info.st_size != n_bytes):
            return "damaged"
        return "ok"

    def verify(self, sha256: str) -> str:
        """``ok``, ``missing`` or ``damaged``: the blob's bytes re-hashed."""
        try:
            digest = hashlib.sha256()
            with self.path(sha256).open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "damaged"
        return "ok" if digest.hexdigest() == sha256 else "damaged"

    def put(self, data: bytes, sha256: str | None = None, *, replace: bool = False) -> str:
        """Store ``data`` (once) and return its sha256.

        Args:
            data: the bytes.
            sha256: their hash, when the caller has just computed it from ``data``.
            replace: write even if a file is there (to repair a damaged blob).
        """
        digest = sha256_hex(data) if sha256 is None else sha256
        target = self.path(digest)
        if target.is_file() and not replace:
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            Path(tmp).replace(target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read(self, sha256: str) -> bytes:
        """Return the blob's bytes.

        Raises:
            StoreError: the blob is missing (the store was moved or pruned).
        """
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(
                f"BlobStore.read: blob {sha256} is missing from {self.root}; "
                "re-ingest the source or point --data-dir at the right store"
            ) from exc
