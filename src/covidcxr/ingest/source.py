"""Where a source is and how to read it: :class:`SourceSpec` and :func:`resolve_source`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import MetadataError
from covidcxr.ingest.files import is_dicom
from covidcxr.ingest.mapping import SourceMapping

DEFAULT_METADATA = "metadata.csv"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe"})


@dataclass(frozen=True)
class SourceSpec:
    """Where a source is and how to read it."""

    name: str
    root: Path
    metadata: Path
    kind: str
    mapping: SourceMapping | None = None
    #: The de-identification key's folder (the store's data directory); DICOM files
    #: are de-identified and kept as PNG. ``None``: a throwaway key (``check``).
    deid_dir: Path | None = None

    @property
    def default_folder(self) -> str | None:
        """Folder of images for rows that name none (from the mapping)."""
        return self.mapping.images if self.mapping else None

    def display(self, path: Path) -> str:
        """``path`` relative to the source root when inside it."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def resolve_source(
    path: str | os.PathLike[str],
    *,
    metadata: str | os.PathLike[str] | None = None,
    mapping: SourceMapping | None = None,
    name: str | None = None,
) -> SourceSpec:
    """Work out the source root, metadata file and name from what the user gave.

    Args:
        path: the source folder (upstream layout: ``metadata.csv``, ``images/``,
            ``annotations/``) or its metadata CSV.
        metadata: another metadata file (relative to the folder, or a path), e.g.
            ``metadata-latest.csv``.
        mapping: a mapping for sources in another layout.
        name: the source name in the store (default: mapping's name or folder name).

    Raises:
        MetadataError: the folder or metadata file does not exist.
    """
    given = Path(path).expanduser()
    if given.is_file():
        root, default_metadata = given.parent, given
    elif given.is_dir():
        meta_name = (mapping.metadata if mapping and mapping.metadata else None) or DEFAULT_METADATA
        root, default_metadata = given, given / meta_name
    else:
        raise MetadataError(f"resolve_source: {given} does not exist")
    root = root.resolve()
    if metadata is not None:
        candidate = Path(metadata).expanduser()
        metadata_path = candidate if candidate.is_absolute() else root / candidate
        if not metadata_path.is_file() and candidate.is_file():
            metadata_path = candidate.resolve()
    else:
        metadata_path = default_metadata
    dicom_folder = metadata is None and not metadata_path.is_file() and given.is_dir()
    if dicom_folder and _holds_dicom(root):
        return SourceSpec(name=name or root.name, root=root, metadata=root, kind="dicom")
    if not metadata_path.is_file():
        raise MetadataError(
            f"resolve_source: no metadata file {metadata_path}; give the folder of a "
            "collection with a metadata.csv, or the CSV itself, or --metadata FILE"
        )
    source_name = name or (mapping.name if mapping and mapping.name else None) or root.name
    return SourceSpec(
        name=source_name,
        root=root,
        metadata=metadata_path.resolve(),
        kind="mapped" if mapping is not None else "upstream",
        mapping=mapping,
    )


def _holds_dicom(root: Path) -> bool:
    """Whether a folder (or any folder under it) holds a DICOM file, by content."""
    return any(is_dicom(_head(path)) for path in _source_files(root))


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(512)
    except OSError:
        return b""


def _source_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, sorted, hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path
