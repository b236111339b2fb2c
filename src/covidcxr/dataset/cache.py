"""The on-disk cache of preprocessed pixels: one ``.npy`` file per image, written atomically.

Layout and why: ``docs/decisions/0011-preprocess-cache-npy-files.md``. The cache can be
deleted at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

import numpy as np
import PIL
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

#: The crops the loader knows (see :func:`covidcxr.dataset.loading.load_image`).
CROPS: Final[tuple[str, ...]] = ("center", "pad")

#: Version of the cached pixels: the file layout and resize settings (the number), and
#: the Pillow that decoded and resized them, so that an upgrade never mixes pixels of
#: two versions. Part of the cache folder's name.
CACHE_VERSION: Final = f"4-pillow{PIL.__version__}"

_SHA256: Final = re.compile("[0-9a-f]{64}")
_FOLDER: Final = re.compile(r"v(.+)-[0-9]+-(?:center|pad)(?:-mask)?")


def check_request(function: str, size: int, crop: str) -> None:
    """Refuse an output size that is not a positive int, or an unknown crop.

    Raises:
        ValueError: naming ``function`` and the bad value.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{function}: size must be a positive int, got {size!r}")
    if crop not in CROPS:
        raise ValueError(f"{function}: crop {crop!r} is not one of {', '.join(CROPS)}")


class PreprocessCache:
    """Preprocessed ``size x size`` ``uint8`` pixels on disk, keyed by the source's
    sha256, the size, the crop, the kind and :data:`CACHE_VERSION`.

    Each record is ``<folder>/<sha256>.npy``, written to a temporary file in the same
    folder and renamed into place, so any number of threads and processes (DataLoader
    workers) can fill the cache at once and a record is whole or absent, also after a
    crash. A file that does not read back as the expected array is logged, treated as
    missing and written again; a cache that cannot be written is logged once and
    otherwise ignored.

    Attributes:
        root: the cache root (several sizes and crops share it).
        size: the output side in pixels.
        crop: the crop (see :func:`~covidcxr.dataset.loading.load_image`).
        kind: ``image`` or ``mask``.
        folder: where this size/crop/kind's files are.
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
        check_request("PreprocessCache", size, crop)
        if kind not in ("image", "mask"):
            raise ValueError(f"PreprocessCache: kind {kind!r} is not 'image' or 'mask'")
        self.root = Path(root)
        self.size = size
        self.crop = crop
        self.kind = kind
        suffix = "-mask" if kind == "mask" else ""
        self.folder = self.root / f"v{CACHE_VERSION}-{size}-{crop}{suffix}"
        self._write_failed = False

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.folder)!r})"

    def path(self, sha256: str) -> Path:
        """The file that holds (or will hold) the pixels of ``sha256``.

        Raises:
            ValueError: ``sha256`` is not a lowercase hex sha256.
        """
        if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
            raise ValueError(f"PreprocessCache: {sha256!r} is not a lowercase hex sha256")
        return self.folder / f"{sha256}.npy"

    def get(self, sha256: str) -> NDArray[np.uint8] | None:
        """The cached pixels, or ``None`` when absent or unreadable."""
        path = self.path(sha256)
        try:
            pixels = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("PreprocessCache: %s is unreadable (%s); rebuilding it", path, exc)
            return None
        if pixels.dtype != np.uint8 or pixels.shape != (self.size, self.size):
            logger.warning(
                "PreprocessCache: %s holds %s %s, expected uint8 %dx%d; rebuilding it",
                path,
                pixels.dtype,
                pixels.shape,
                self.size,
                self.size,
            )
            return None
        return pixels  # type: ignore[no-any-return]

    def put(self, sha256: str, pixels: NDArray[np.uint8]) -> None:
        """Store the pixels of ``sha256`` (replacing any record of it).

        Raises:
            ValueError: ``sha256`` is not a lowercase hex sha256, or ``pixels`` is not a
                ``size x size`` ``uint8`` array.
        """
        path = self.path(sha256)
        if pixels.dtype != np.uint8 or pixels.shape != (self.size, self.size):
            raise ValueError(
                f"PreprocessCache.put: expected uint8 {self.size}x{self.size} pixels, got "
                f"{pixels.dtype} {pixels.shape}"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            temporary = Path(name)
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    np.save(handle, pixels, allow_pickle=False)
                temporary.replace(path)  # atomic: readers see the whole record or none
            except BaseException:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                raise
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                logger.warning(
                    "PreprocessCache: cannot write to %s (%s); going on without caching "
                    "(pass cache_dir=None to switch the cache off)",
                    self.folder,
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


def stale_folders(root: str | os.PathLike[str]) -> list[Path]:
    """The folders under a cache root that another CACHE_VERSION wrote (an older
    layout, or another Pillow: nothing reads them now, so they can be deleted), sorted."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = _FOLDER.fullmatch(entry.name)
        if match and match.group(1) != CACHE_VERSION and entry.is_dir():
            stale.append(Path(entry.path))
    return sorted(stale)
