"""What a scan found: its records, images, annotations and report (nothing written)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidcxr.imaging.decode import ImageInfo
from covidcxr.ingest.report import Report
from covidcxr.ingest.source import SourceSpec
from covidcxr.schema.record import MetadataRecord


@dataclass
class ScannedRecord:
    """A record from one metadata row, with the state of its image."""

    line: int
    record: MetadataRecord
    extra: dict[str, Any]
    image_status: str = "missing"
    image_sha256: str | None = None


@dataclass(frozen=True)
class ScannedImage:
    """A decodable image file (content-addressed) and where it was read."""

    sha256: str
    path: Path
    info: ImageInfo
    phash: str | None
    phash_detail: str | None
    #: ``"DICOM"``: the stored bytes are the de-identified PNG made from ``path``.
    converted_from: str | None = None


@dataclass(frozen=True)
class ScannedAnnotation:
    """An annotation resolved to the image it describes."""

    image_sha256: str
    kind: str
    annotator: str
    file: str
    label: str = ""
    geographic_mean: float | None = None
    opacity_mean: float | None = None
    mask_sha256: str | None = None
    mask_path: Path | None = None
    mask_values: str | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class ScanResult:
    """Everything a scan found (a scan writes nothing)."""

    spec: SourceSpec
    metadata_sha256: str
    records: list[ScannedRecord] = field(default_factory=list)
    images: dict[str, ScannedImage] = field(default_factory=dict)
    annotations: list[ScannedAnnotation] = field(default_factory=list)
    #: Seconds spent per phase (metadata, images, annotations), for logs and benchmarks.
    timings: dict[str, float] = field(default_factory=dict)
    #: The key folder DICOM files were de-identified with (see SourceSpec.deid_dir).
    deid_dir: str | None = None
    report: Report = field(init=False)

    def __post_init__(self) -> None:
        self.report = Report(self.spec.name, str(self.spec.root))
