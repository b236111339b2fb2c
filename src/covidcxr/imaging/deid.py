"""DICOM de-identification: the PS3.15 Basic Application Level Confidentiality Profile,
keyed pseudonyms, dates kept only as day offsets. Decisions in
``docs/decisions/0050-dicom-reader-and-deid.md``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import hmac
import io
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal

from covidcxr.errors import MissingExtraError, StoreError
from covidcxr.imaging.decode import DEFAULT_MAX_PIXELS
from covidcxr.imaging.dicom import DicomMetadata, pydicom_quiet, read_dicom

try:
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.tag import BaseTag
except ImportError as exc:  # pragma: no cover - the dicom extra is missing
    raise MissingExtraError("dicom-anonymizer", "dicom") from exc

__all__ = [
    "KEY_FILE",
    "PROFILE_EDITION",
    "Deidentified",
    "DeidentifiedImage",
    "day_offsets",
    "deidentified_bytes",
    "deidentify",
    "deidentify_image",
    "keyed_uid",
    "load_key",
    "profile_actions",
    "pseudonym",
]

logger = logging.getLogger(__name__)

#: The key file's name in the store's data directory.
KEY_FILE: Final = "deid.key"
#: The edition of PS3.15 Table E.1-1 applied, as dicom-anonymizer (KitwareMedical) ships
#: it generated from the standard.
PROFILE_EDITION: Final = "dicomfields_2026c"
#: PS3.16 CID 7050 code for the profile, recorded in the de-identified header.
BASIC_PROFILE_CODE: Final = ("113100", "DCM", "Basic Application Confidentiality Profile")

Action = Literal["X", "Z", "D", "U"]
# Table E.1-1's compound actions ("X/Z": remove unless the IOD needs it empty) resolve
# to their first letter: nothing here needs IOD conformance more than less data.
_CATEGORY_ACTION: Final[Mapping[str, Action]] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z",
    "X_Z_TAGS": "X",
    "X_D_TAGS": "X",
    "X_Z_D_TAGS": "X",
    "X_Z_U_STAR_TAGS": "X",
}
_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DUMMY_TEXT: Final = "REMOVED"
_KEY_BYTES: Final = 32


@dataclass(frozen=True, eq=False)
class Deidentified:
    """A de-identified header.

    Attributes:
        dataset: a de-identified copy (the input is left untouched).
        patient_pseudonym: the keyed pseudonym now in PatientID and PatientName.
        burned_in_annotation: the header says ``BurnedInAnnotation = YES``: identity
            may be written in the pixels, which de-identification of the header does
            not touch.
        warnings: what the caller should report (no header value is quoted).
    """

    dataset: Dataset
    patient_pseudonym: str
    burned_in_annotation: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Rules:
    exact: Mapping[int, Action]
    masked: tuple[tuple[int, int, int, int, Action], ...]

    def action(self, tag: BaseTag) -> Action | None:
        found = self.exact.get(int(tag))
        if found is not None:
            return found
        for group, element, group_mask, element_mask, action in self.masked:
            if (tag.group & group_mask, tag.element & element_mask) == (group, element):
                return action
        return None


@cache
def profile_actions() -> _Rules:
    """Table E.1-1 of PS3.15 (edition :data:`PROFILE_EDITION`) as tag -> action.

    Actions: ``X`` remove, ``Z`` empty, ``D`` dummy value, ``U`` keyed UID.
    """
    table = dicom_anonymization_database_selector(PROFILE_EDITION)
    exact: dict[int, Action] = {}
    masked: list[tuple[int, int, int, int, Action]] = []
    for category, action in _CATEGORY_ACTION.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append(
                    (group & group_mask, element & element_mask, group_mask, element_mask, action)
                )
    return _Rules(exact, tuple(masked))


def load_key(data_dir: str | os.PathLike[str]) -> bytes:
    """The store's pseudonym key, created (``<data_dir>/deid.key``, mode 0600) on first use.

    The same key gives the same pseudonym and UIDs on every re-ingest; losing it breaks
    the link to earlier ingests, and anyone holding it can test a guessed patient id.

    Raises:
        StoreError: the key file cannot be created or read, or is too short.
    """
    path = Path(data_dir) / KEY_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_key(path)
        key = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise StoreError(
            f"load_key: cannot create or read {str(path)!r} ({exc.strerror or exc}); "
            "check the data directory's permissions"
        ) from exc
    if len(key) < _KEY_BYTES:
        raise StoreError(
            f"load_key: {str(path)!r} holds {len(key)} bytes, expected {_KEY_BYTES}; "
            "restore it from a backup (a new key gives every patient a new pseudonym)"
        )
    if mode & 0o077:
        logger.warning(
            "load_key: %r is readable by others (mode %o); chmod 600 it", str(path), mode
        )
    return key


def _create_key(path: Path) -> None:
    """Write a new key next to ``path`` and link it into place: two processes racing
    end up with the same key, and no reader sees a half-written one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(_KEY_BYTES))
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def pseudonym(key: bytes, identity: str) -> str:
    """The keyed pseudonym of a patient identity: ``anon-`` and 16 hex digits of
    HMAC-SHA256(key, identity)."""
    digest = hmac.new(key, identity.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"anon-{digest[:16]}"


def keyed_uid(key: bytes, uid: str) -> str:
    """A replacement UID: ``2.25.`` and the first 128 bits of HMAC-SHA256(key, uid) as a
    decimal number (PS3.5 B.2), the same for the same UID and key."""
    digest = hmac.new(key, b"uid:" + uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def deidentify(dataset: Dataset, key: bytes, *, name: str = "<dataset>") -> Deidentified:
    """Apply the Basic Application Level Confidentiality Profile to a copy of ``dataset``.

    Private tags are removed; every attribute of Table E.1-1 is removed, emptied, given
    a dummy value or a keyed UID, in nested sequences too; dates and times are removed
    (use :func:`day_offsets` on the dates read before); PatientID and PatientName become
    the keyed :func:`pseudonym` of the patient's identity (IssuerOfPatientID and
    PatientID, else name and birth date, else the study). PatientIdentityRemoved and
    the de-identification method are recorded.

    Args:
        dataset: the header as read (left untouched).
        key: the store's key (:func:`load_key`).
        name: the file's name, for warnings.

    Returns:
        The de-identified copy, the pseudonym and what to report.
    """
    rules = profile_actions()
    with pydicom_quiet(name):
        result = copy.deepcopy(dataset)
        identity, basis = _identity(result)
        alias = pseudonym(key, identity)
        burned = str(result.get("BurnedInAnnotation", "")).strip().upper() == "YES"
        result.remove_private_tags()

        def apply(ds: Dataset, element: DataElement) -> None:
            _apply(ds, element, rules.action(element.tag), key)

        result.walk(apply)
        if hasattr(result, "file_meta"):
            result.file_meta.walk(apply)
        _mark(result, alias)
    notes = [] if basis == "PatientID" else [f"{name}: no PatientID, pseudonym from {basis}"]
    if burned:
        notes.append(
            f"{name}: BurnedInAnnotation is YES: the pixels may show patient identity; "
            "review them before sharing"
        )
    return Deidentified(result, alias, burned, tuple(notes))


def _identity(dataset: Dataset) -> tuple[str, str]:
    patient_id = str(dataset.get("PatientID") or "").strip()
    if patient_id:
        return f"id:{str(dataset.get('IssuerOfPatientID') or '').strip()}|{patient_id}", "PatientID"
    patient_name = str(dataset.get("PatientName") or "").strip()
    if patient_name:
        birth = str(dataset.get("PatientBirthDate") or "").strip()
        return f"name:{patient_name.upper()}|{birth}", "PatientName and PatientBirthDate"
    return f"study:{dataset.get('StudyInstanceUID') or ''}", "StudyInstanceUID"


def _apply(dataset: Dataset, element: DataElement, action: Action | None, key: bytes) -> None:
    if action is None:
        return
    if action == "X":
        del dataset[element.tag]
    elif action == "U" and element.VR == "UI":
        values = element.value if element.VM > 1 else [element.value]
        replaced = [keyed_uid(key, str(uid)) for uid in values if uid]
        element.value = replaced if len(replaced) > 1 else (replaced[0] if replaced else "")
    elif action == "D" and element.VR in _TEXT_VRS:
        element.value = _DUMMY_TEXT
    elif element.VR == "SQ":
        element.value = Sequence()
    else:  # Z, and D on dates, numbers and bytes: an empty value
        element.value = None


def _mark(dataset: Dataset, alias: str) -> None:
    """Pseudonym in, and the method recorded (PS3.15 E.1.1)."""
    dataset.PatientID = alias
    dataset.PatientName = alias
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = f"covidcxr: PS3.15 Basic Profile ({PROFILE_EDITION})"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = Sequence([code])


def deidentified_bytes(result: Deidentified) -> bytes:
    """The de-identified dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    with pydicom_quiet("<de-identified>"):
        result.dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def day_offsets(studies: Iterable[tuple[str, dt.date | None]]) -> list[int | None]:
    """Each study's day offset from its patient's first study.

    Args:
        studies: ``(patient pseudonym, study date)`` pairs, dates from
            :attr:`covidcxr.imaging.dicom.DicomMetadata.study_date`.

    Returns:
        Days since the same patient's earliest dated study, in input order (``None``
        where the date is unknown); the dates themselves are not kept.
    """
    pairs = list(studies)
    first: dict[str, dt.date] = {}
    for patient, day in pairs:
        if day is not None and (patient not in first or day < first[patient]):
            first[patient] = day
    return [None if day is None else (day - first[patient]).days for patient, day in pairs]


@dataclass(frozen=True)
class DeidentifiedImage:
    """What may be kept of a DICOM image: its displayed pixels as PNG and the
    de-identified header fields.

    Attributes:
        png: the grey levels as displayed (:func:`covidcxr.imaging.dicom.read_dicom`),
            PNG-encoded: the bytes a store keeps (no header travels with them).
        patient_pseudonym: the keyed pseudonym (:func:`pseudonym`).
        sop_instance_uid: the keyed replacement of SOPInstanceUID (:func:`keyed_uid`).
        metadata: modality, view, sex, age and flags read from the header. Its
            ``study_date`` is identifying: pass it to :func:`day_offsets` and drop it.
        warnings: what the caller should report (no header value is quoted).
    """

    png: bytes
    patient_pseudonym: str
    sop_instance_uid: str
    metadata: DicomMetadata
    warnings: tuple[str, ...]


def deidentify_image(
    data: bytes, key: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DeidentifiedImage:
    """Decode a DICOM file and keep only what may be kept.

    Raises:
        ImageError: any refusal of :func:`covidcxr.imaging.dicom.read_dicom`.
    """
    decoded = read_dicom(data, name=name, max_pixels=max_pixels)
    result = deidentify(decoded.dataset, key, name=name)
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="PNG")
    return DeidentifiedImage(
        png=buffer.getvalue(),
        patient_pseudonym=result.patient_pseudonym,
        sop_instance_uid=str(result.dataset.get("SOPInstanceUID") or ""),
        metadata=decoded.metadata,
        warnings=result.warnings,
    )
