"""Prediction inputs: files to predict on, in-memory images, and preprocessing."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.dataset import loading
from covidcxr.errors import MetadataError


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files to predict on: files as given, directories walked (sorted, recursive).

    Hidden files and folders (names starting with ``.``) inside a directory are skipped;
    every other file is kept, image or not: the prediction decides by content and
    reports what is not a PNG or JPEG.

    Raises:
        MetadataError: a path does not exist.
    """
    found: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(Path(root) / name for name in sorted(files) if name[0] != ".")
        elif path.exists():
            found.append(path)
        else:
            raise MetadataError(f"predict: {str(path)!r} does not exist; check the path")
    return found


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` must not be opened as an image file, or ``None`` when it may be.

    A FIFO would block the reader, a device never ends; a dangling link or a link loop
    cannot be read. Links to regular files are fine.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if path.is_symlink():
            return f"is a broken or looping symbolic link ({exc.strerror or exc})"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    what = next((name for test, name in kinds if test(mode)), "a device or special file")
    return f"is {what}, not a regular image file; skipped"


def as_image(image: Image.Image | NDArray[Any]) -> Image.Image:
    """An in-memory image as a Pillow image.

    Accepts Pillow images and arrays: ``(H, W)`` uint8, uint16 (16-bit) or float in
    [0, 1]; ``(H, W, 3)`` or ``(H, W, 4)`` uint8 (RGB, RGBA).

    Raises:
        ValueError: any other array.
    """
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    # Pillow infers the mode from the dtype and shape: L, I;16, F, RGB, RGBA.
    grey = array.ndim == 2 and (
        array.dtype in (np.uint8, np.uint16) or np.issubdtype(array.dtype, np.floating)
    )
    if grey and np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    colour = array.ndim == 3 and array.dtype == np.uint8 and array.shape[2] in (3, 4)
    if grey or colour:
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"as_image: expected (H, W) uint8/uint16/float or (H, W, 3|4) uint8, got "
        f"{array.dtype} {array.shape}"
    )


def preprocess(image: Image.Image, size: int) -> NDArray[np.uint8]:
    """The network's input pixels from a decoded image, as training made them
    (:func:`covidcxr.dataset.loading.preprocess_image`)."""
    return loading.preprocess_image(image, size)


def grey_levels(image: Image.Image) -> NDArray[np.uint8]:
    """The whole image as uint8 grey levels (the heatmap overlay's background)."""
    return loading.grey_levels(image)
