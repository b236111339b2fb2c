"""The database tables (SQLAlchemy 2 declarative models).

Identity rules (DESIGN.md): an image is its sha256; a patient is
``(source, patient_id)``; a record is one metadata row, keyed by
``(source, patient, row_key)`` where ``row_key`` is the image path below the
source root. Names match the CSV/JSON column names (``offset_days``,
``age_years``). Changing a table means adding an Alembic migration in
``covidcxr/store/migrations/versions`` (``tests/store/test_migrations.py`` fails
when the models and the migrations disagree).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IMAGE_STATUSES = ("stored", "missing", "rejected")
ANNOTATION_KINDS = ("severity", "lung_mask", "lung_box")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


def _between(column: str, low: float, high: float) -> str:
    return f"{column} IS NULL OR ({column} >= {low} AND {column} <= {high})"


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (needed by Alembic)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Source(Base):
    """A source of images and metadata: the upstream collection, NIH, a hospital."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    root: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Patient(Base):
    """A patient, identified within its source."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("source_id", "patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    # Indexed on its own too: ``list --patient P123`` searches every source.
    patient_id: Mapped[str] = mapped_column(String(200), index=True)


class Image(Base):
    """An image file, content-addressed: stored once however often it is referenced."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint("length(sha256) = 64", name="sha256_length"),
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
        CheckConstraint("n_bytes > 0", name="positive_bytes"),
        CheckConstraint("bit_depth IN (1, 8, 16, 32)", name="bit_depth"),
        CheckConstraint("channels BETWEEN 1 AND 4", name="channels"),
    )

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    n_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bit_depth: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    phash: Mapped[str | None] = mapped_column(String(16), index=True)
    phash_detail: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Record(Base):
    """One metadata row: an image reference with its provenance and finding."""

    __tablename__ = "records"
    __table_args__ = (
        UniqueConstraint("source_id", "patient_pk", "row_key"),
        CheckConstraint(_in("image_status", IMAGE_STATUSES), name="image_status"),
        CheckConstraint(
            "(image_status = 'stored') = (image_sha256 IS NOT NULL)", name="stored_has_image"
        ),
        Index("ix_records_source_line", "source_id", "line"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    patient_pk: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    row_key: Mapped[str] = mapped_column(Text)
    line: Mapped[int] = mapped_column(Integer)
    folder: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("images.sha256", ondelete="RESTRICT"), index=True
    )
    image_status: Mapped[str] = mapped_column(String(16))
    view: Mapped[str | None] = mapped_column(String(16), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    finding: Mapped[str | None] = mapped_column(Text)
    finding_status: Mapped[str] = mapped_column(String(16))
    date: Mapped[str | None] = mapped_column(Text)
    acquired_on: Mapped[dt.date | None] = mapped_column(Date)
    acquired_year: Mapped[int | None] = mapped_column(Integer)
    location: Mapped[str | None] = mapped_column(Text)
    doi: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    license: Mapped[str | None] = mapped_column(Text)
    clinical_notes: Mapped[str | None] = mapped_column(Text)
    other_notes: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[str] = mapped_column(Text, default="")
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    content_hash: Mapped[str] = mapped_column(String(64))


class Observation(Base):
    """The clinical attributes of one record (one row per record)."""

    __tablename__ = "observations"
    __table_args__ = (
        CheckConstraint(_between("age_years", 0, 120), name="age_years_range"),
        CheckConstraint(_between("offset_days", -3650, 3650), name="offset_days_range"),
        CheckConstraint(_between("temperature_c", 25, 45), name="temperature_c_range"),
        CheckConstraint(_between("po2_saturation_pct", 0, 100), name="po2_saturation_range"),
        CheckConstraint("sex IS NULL OR sex IN ('M', 'F')", name="sex"),
        CheckConstraint(
            "rt_pcr_positive IS NULL OR rt_pcr_positive IN ('Y', 'N', 'Unclear')",
            name="rt_pcr_positive",
        ),
    )

    record_id: Mapped[int] = mapped_column(
        ForeignKey("records.id", ondelete="CASCADE"), primary_key=True
    )
    offset_days: Mapped[int | None] = mapped_column(Integer)
    # No index on sex or age: two values, or a range that usually holds most rows, so
    # an index there only lures the planner away from the findings and listing order.
    sex: Mapped[str | None] = mapped_column(String(1))
    age_years: Mapped[float | None] = mapped_column(Float)
    rt_pcr_positive: Mapped[str | None] = mapped_column(String(8))
    survival: Mapped[bool | None] = mapped_column(Boolean)
    intubated: Mapped[bool | None] = mapped_column(Boolean)
    intubation_present: Mapped[bool | None] = mapped_column(Boolean)
    went_icu: Mapped[bool | None] = mapped_column(Boolean)
    in_icu: Mapped[bool | None] = mapped_column(Boolean)
    needed_supplemental_o2: Mapped[bool | None] = mapped_column(Boolean)
    extubated: Mapped[bool | None] = mapped_column(Boolean)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    po2_saturation_pct: Mapped[float | None] = mapped_column(Float)
    leukocyte_count_k_per_ul: Mapped[float | None] = mapped_column(Float)
    neutrophil_count_k_per_ul: Mapped[float | None] = mapped_column(Float)
    lymphocyte_count_k_per_ul: Mapped[float | None] = mapped_column(Float)


class Finding(Base):
    """One finding token of a record, as a canonical hierarchy path."""

    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("record_id", "path"),
        # Covering index for hierarchy filters: path -> record ids without table reads.
        Index("ix_findings_path_record", "path", "record_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(300))
    token: Mapped[str] = mapped_column(Text)


class Annotation(Base):
    """An expert annotation of an image: severity scores, a lung mask or a lung box."""

    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("source_id", "image_sha256", "kind", "annotator", "label"),
        CheckConstraint(_in("kind", ANNOTATION_KINDS), name="kind"),
        CheckConstraint(_between("geographic_mean", 0, 8), name="geographic_range"),
        CheckConstraint(_between("opacity_mean", 0, 6), name="opacity_range"),
        CheckConstraint(
            "kind != 'severity' OR (geographic_mean IS NOT NULL AND opacity_mean IS NOT NULL)",
            name="severity_values",
        ),
        CheckConstraint("kind != 'lung_mask' OR mask_sha256 IS NOT NULL", name="mask_blob"),
        CheckConstraint(
            "kind != 'lung_box' OR (box_width > 0 AND box_height > 0)", name="box_size"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    image_sha256: Mapped[str] = mapped_column(
        ForeignKey("images.sha256", ondelete="RESTRICT"), index=True
    )
    kind: Mapped[str] = mapped_column(String(20))
    annotator: Mapped[str] = mapped_column(String(100))
    label: Mapped[str] = mapped_column(String(100), default="")
    file: Mapped[str] = mapped_column(Text)
    geographic_mean: Mapped[float | None] = mapped_column(Float)
    opacity_mean: Mapped[float | None] = mapped_column(Float)
    mask_sha256: Mapped[str | None] = mapped_column(String(64))
    mask_values: Mapped[str | None] = mapped_column(String(40))
    box_x: Mapped[float | None] = mapped_column(Float)
    box_y: Mapped[float | None] = mapped_column(Float)
    box_width: Mapped[float | None] = mapped_column(Float)
    box_height: Mapped[float | None] = mapped_column(Float)


class IngestLog(Base):
    """One ingest run: what was read, what changed, where the report is."""

    __tablename__ = "ingest_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int | None] = mapped_column(ForeignKey("sources.id", ondelete="SET NULL"))
    source_name: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    metadata_path: Mapped[str] = mapped_column(Text)
    metadata_sha256: Mapped[str] = mapped_column(String(64))
    tool_version: Mapped[str] = mapped_column(String(40))
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    report_path: Mapped[str | None] = mapped_column(Text)
