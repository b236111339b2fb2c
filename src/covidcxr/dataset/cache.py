"""The on-disk cache of preprocessed pixels: pack files of fixed-size records.

A first epoch decodes every image once and stores the result here, keyed by the
source's sha256, the output size, the crop and the kind (image or lung mask); later
epochs read the pixels back and decode nothing.

Each writer (a DataLoader worker, :func:`~covidcxr.dataset.loading.fill_cache`, a
training run) appends to a pack file that no other writer holds: it holds the pack's
``flock`` while it has the file open, and takes over the pack of a writer that is gone.
Readers take no lock at all. A first epoch creates one file per writing process, not
one per image (creating a file and a folder per image cost a first epoch 10-15% of its
throughput on ext4, and several times more where many files had just been deleted: the
kernel checks every recently deleted inode it passes when it allocates one), and a
folder keeps about as many packs as there were writers at once.

Layout: ``<root>/v<CACHE_VERSION>-<size>-<crop>[-mask]/<pid>-<random>.pack``. A pack is
a sequence of records of ``48 + size * size`` bytes: the magic ``CXRPACK3``, the
source's sha256 (32 bytes), the height and the width (little-endian ``uint32``), then
the ``uint8`` pixels row by row. Records are whole or ignored: a reader counts only the
records the file's length covers, checks each record's header before it uses it, and a
writer whose write came out short (a full disk) abandons its pack, so that no record
ever follows a torn one; the next writer of that pack writes over the torn tail.
Nothing else is kept: the cache can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

#: Version of the cached pixels (filter, rounding, file layout). Part of the cache
#: folder's name, so that a change never reads stale files.
CACHE_VERSION: Final = 3

_MAGIC: Final = b"CXRPACK3"
#: magic, sha256 digest, height, width
_RECORD_HEADER: Final = struct.Struct("<8s32sII")
_PACK_SUFFIX: Final = ".pack"
_SHA256: Final = re.compile("[0-9a-f]{64}")
_FOLDER: Final = re.compile(r"v([0-9]+)-[0-9]+-(?:center|pad)(?:-mask)?")
_OPEN_FLAGS: Final = getattr(os, "O_CLOEXEC", 0)


@dataclass
class _Pack:
    """A pack file this process reads (and, for its own, writes)."""

    name: str
    descriptor: int
    scanned: int  # bytes of whole records already in the index


# Every live cache, so that a forked child drops the locks and the packs that belong to
# its parent (a lock held by another thread at the fork would never be released).
_live_caches: weakref.WeakSet[PreprocessCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PreprocessCache:
    """Preprocessed pixels on disk, keyed by the source's sha256, size, crop and kind.

    Safe to use from several threads and several processes at once (see the module's
    docstring for the layout). A record that is short or whose header does not match is
    treated as missing and written again; a cache that cannot be written is logged once
    and otherwise ignored.

    Attributes:
        root: the cache root (several sizes and crops share it).
        size: the output side in pixels.
        crop: the crop (see :func:`~covidcxr.dataset.loading.load_image`).
        kind: ``image`` or ``mask``.
        folder: where this size/crop/kind's pack files are.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int,
        crop: Literal["center", "pad"] = "center",
        *,
        kind: Literal["image", "mask"] = "image",
    ) -> None:
        """Use ``root`` for pixels of ``size x size`` cut with ``crop``.

        Raises:
            ValueError: ``size``, ``crop`` or ``kind`` is not valid.
        """
        from covidcxr.dataset.loading import check_request  # loading imports this module

        check_request("PreprocessCache", size, crop)
        if kind not in ("image", "mask"):
            raise ValueError(f"PreprocessCache: kind {kind!r} is not 'image' or 'mask'")
        self._setup(Path(root), size, crop, kind)

    def _setup(
        self, root: Path, size: int, crop: Literal["center", "pad"], kind: Literal["image", "mask"]
    ) -> None:
        self.root = root
        self.size = size
        self.crop: Literal["center", "pad"] = crop
        self.kind: Literal["image", "mask"] = kind
        suffix = "-mask" if kind == "mask" else ""
        self.folder = root / f"v{CACHE_VERSION}-{size}-{crop}{suffix}"
        self._folder_text = str(self.folder)
        self._record_bytes = _RECORD_HEADER.size + size * size
        self._lock = threading.Lock()
        self._reset()
        _live_caches.add(self)

    def _reset(self) -> None:
        """No pack open, nothing indexed (a new cache, or the folder was deleted)."""
        self._index: dict[bytes, tuple[_Pack, int]] = {}  # sha256 digest -> pack, offset
        self._packs: dict[str, _Pack] = {}
        self._writer: _Pack | None = None
        self._retired: list[int] = []  # descriptors replaced by a writer's (see _take_over)
        self._write_failed = False

    def _forked(self) -> None:
        # The parent's descriptors stay valid for reading (pread has no shared offset),
        # but its pack is its own to append to (the inherited descriptor shares the
        # parent's lock, so the child's own search for a pack passes it by).
        self._lock = threading.Lock()
        self._writer = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with "spawn" get a pickled copy: what identifies the
        # cache, not this process's descriptors.
        return {"root": self.root, "size": self.size, "crop": self.crop, "kind": self.kind}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["root"], state["size"], state["crop"], state["kind"])

    def __del__(self) -> None:
        if hasattr(self, "_packs"):
            self._close()

    def _close(self) -> None:
        for descriptor in [pack.descriptor for pack in self._packs.values()] + self._retired:
            with contextlib.suppress(OSError):
                os.close(descriptor)

    def __repr__(self) -> str:
        return f"PreprocessCache({self._folder_text!r})"

    def packs(self) -> list[Path]:
        """The pack files now in the folder (none when nothing was cached yet)."""
        try:
            return [self.folder / name for name in sorted(self._pack_names())]
        except FileNotFoundError:
            return []

    def indexed(self, sha256: str) -> bool:
        """Whether this cache already knows of a record of ``sha256`` (no disk access:
        False may still find one on disk)."""
        with self._lock:
            return _digest(sha256, "indexed") in self._index

    def get(self, sha256: str) -> NDArray[np.uint8] | None:
        """The cached pixels, or ``None`` when absent, short or corrupt."""
        digest = _digest(sha256, "get")
        with self._lock:
            found = self._index.get(digest)
            if found is None:
                self._refresh()
                found = self._index.get(digest)
            if found is None:
                return None
        pack, offset = found
        record = np.empty(self._record_bytes, dtype=np.uint8)
        try:
            read = os.preadv(pack.descriptor, [record.data], offset)
        except OSError as exc:
            logger.warning("PreprocessCache: cannot read %s (%s); rebuilding", pack.name, exc)
            read = -1
        header = record[: _RECORD_HEADER.size].tobytes()
        if read != self._record_bytes or header != self._header(digest):
            if read >= 0:
                logger.warning(
                    "PreprocessCache: the record of %s in %s is corrupt; rebuilding it",
                    sha256,
                    pack.name,
                )
            with self._lock:
                if self._index.get(digest) == found:
                    del self._index[digest]
            return None
        return record[_RECORD_HEADER.size :].reshape(self.size, self.size)

    def put(self, sha256: str, pixels: NDArray[np.uint8]) -> None:
        """Append the pixels to this process's pack, unless the cache has them already.

        Raises:
            ValueError: ``sha256`` is not a lowercase hex sha256, or ``pixels`` is not a
                ``size x size`` ``uint8`` array.
        """
        digest = _digest(sha256, "put")
        if pixels.dtype != np.uint8 or pixels.shape != (self.size, self.size):
            raise ValueError(
                f"PreprocessCache.put: expected uint8 {self.size}x{self.size} pixels, got "
                f"{pixels.dtype} {pixels.shape}"
            )
        pixels = np.ascontiguousarray(pixels)
        with self._lock:
            if digest in self._index:
                return
            try:
                writer = self._writer or self._open_writer()
                offset = writer.scanned
                written = os.pwritev(writer.descriptor, [self._header(digest), pixels.data], offset)
                if written != self._record_bytes:
                    # Nothing may follow a torn record: the next put starts a new pack.
                    self._writer = None
                    raise OSError(f"short write ({written} of {self._record_bytes} bytes)")
                writer.scanned = offset + written
                self._index[digest] = (writer, offset)
            except OSError as exc:
                if not self._write_failed:
                    self._write_failed = True
                    logger.warning(
                        "PreprocessCache: cannot write to %s (%s); going on without caching "
                        "(pass cache_dir=None to switch the cache off)",
                        self._folder_text,
                        exc,
                    )

    def get_or_load(self, sha256: str, load: Callable[[], NDArray[np.uint8]]) -> NDArray[np.uint8]:
        """The cached pixels, or ``load()``'s result, stored for next time."""
        cached = self.get(sha256)
        if cached is not None:
            return cached
        pixels = load()
        self.put(sha256, pixels)
        return pixels

    # -- under the lock ---------------------------------------------------------------

    def _header(self, digest: bytes) -> bytes:
        return _RECORD_HEADER.pack(_MAGIC, digest, self.size, self.size)

    def _open_writer(self) -> _Pack:
        """A pack to append to: one that no writer holds now, else a new one.

        A writer holds its pack's lock (``flock``) as long as it has the file open, so
        a pack is taken over only once its writer is gone, and the folder keeps about
        as many packs as there were writers at once, not one per run. Where the file
        system has no locks, every writer makes a pack of its own.
        """
        os.makedirs(self._folder_text, exist_ok=True)  # noqa: PTH103 - strings here
        for name in sorted(self._pack_names()):
            pack = self._take_over(name)
            if pack is not None:
                return pack
        name = f"{os.getpid()}-{secrets.token_hex(6)}{_PACK_SUFFIX}"
        descriptor = os.open(
            f"{self._folder_text}{os.sep}{name}",
            os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
            0o644,
        )
        _lock(descriptor)
        pack = self._packs[name] = self._writer = _Pack(name, descriptor, 0)
        return pack

    def _take_over(self, name: str) -> _Pack | None:
        """Become the writer of the pack ``name`` if no writer holds it."""
        try:
            descriptor = os.open(f"{self._folder_text}{os.sep}{name}", os.O_RDWR | _OPEN_FLAGS)
        except OSError:
            return None
        if not _lock(descriptor):
            os.close(descriptor)
            return None
        pack = self._packs.get(name)
        if pack is None:
            pack = self._packs[name] = _Pack(name, descriptor, 0)
        else:  # read until now: another thread may be reading through the old descriptor
            self._retired.append(pack.descriptor)
            pack.descriptor = descriptor
        self._scan(pack)  # the next record goes after its last whole one (over a torn tail)
        self._writer = pack
        return pack

    def _pack_names(self) -> list[str]:
        """The names of the pack files in the folder (FileNotFoundError without one)."""
        return [e.name for e in os.scandir(self._folder_text) if e.name.endswith(_PACK_SUFFIX)]

    def _refresh(self) -> None:
        """Index the records that other processes (or caches) appended since last time."""
        try:
            names = self._pack_names()
        except FileNotFoundError:
            if self._packs:  # the cache was deleted: start again from nothing
                self._close()
                self._reset()
            return
        except OSError as exc:
            logger.warning("PreprocessCache: cannot list %s (%s)", self._folder_text, exc)
            return
        for name in names:
            if name not in self._packs:
                try:
                    descriptor = os.open(
                        f"{self._folder_text}{os.sep}{name}", os.O_RDONLY | _OPEN_FLAGS
                    )
                except OSError:
                    continue  # deleted since the listing, or not readable: skip it
                self._packs[name] = _Pack(name, descriptor, 0)
        for pack in self._packs.values():
            if pack is not self._writer:  # the writer's records are indexed as written
                self._scan(pack)

    def _scan(self, pack: _Pack) -> None:
        """Index the whole records of ``pack`` after those already indexed."""
        step = self._record_bytes
        try:
            whole = os.fstat(pack.descriptor).st_size // step * step
        except OSError:
            return
        for offset in range(pack.scanned, whole, step):
            header = os.pread(pack.descriptor, _RECORD_HEADER.size, offset)
            if len(header) < _RECORD_HEADER.size:
                whole = offset
                break
            magic, digest, height, width = _RECORD_HEADER.unpack(header)
            if magic == _MAGIC and height == width == self.size:
                self._index.setdefault(digest, (pack, offset))
        pack.scanned = max(pack.scanned, whole)


try:
    import fcntl
except ImportError:  # not POSIX: no locks, so every writer makes a pack of its own

    def _lock(descriptor: int) -> bool:
        return False

else:

    def _lock(descriptor: int) -> bool:
        """Take a pack's writer lock without waiting; False where another open file
        holds it or the file system has no locks."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True


def stale_folders(root: str | os.PathLike[str]) -> list[Path]:
    """The folders under a cache root that an older CACHE_VERSION wrote (nothing reads
    them any more: they can be deleted), sorted."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = _FOLDER.fullmatch(entry.name)
        if match and int(match.group(1)) != CACHE_VERSION and entry.is_dir():
            stale.append(Path(entry.path))
    return sorted(stale)


def _digest(sha256: str, function: str) -> bytes:
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise ValueError(f"PreprocessCache.{function}: {sha256!r} is not a lowercase hex sha256")
    return bytes.fromhex(sha256)
