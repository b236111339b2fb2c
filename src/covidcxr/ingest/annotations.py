"""Reading a source's annotations: severity scores, lung masks, lung boxes (a scan step)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from covidcxr.ingest.files import FileJob, process_files
from covidcxr.ingest.report import Action
from covidcxr.ingest.scanned import ScannedAnnotation, ScanResult
from covidcxr.ingest.table import read_table
from covidcxr.schema.values import Severity

ANNOTATIONS_DIR = "annotations"


@dataclass
class _ImageIndex:
    """Stored images of this scan by file name and by stem (for masks)."""

    by_name: dict[str, str]
    by_stem: dict[str, str]
    sizes: dict[str, tuple[int, int]]

    @classmethod
    def build(cls, result: ScanResult) -> _ImageIndex:
        by_name: dict[str, str] = {}
        by_stem: dict[str, str] = {}
        for scanned in result.records:
            if scanned.image_sha256 is None:
                continue
            name = Path(scanned.record.filename).name
            by_name[name] = scanned.image_sha256
            by_stem[Path(name).stem] = scanned.image_sha256
        sizes = {sha: (img.info.width, img.info.height) for sha, img in result.images.items()}
        return cls(by_name, by_stem, sizes)


def _read_severity(path: Path, result: ScanResult, index: _ImageIndex) -> None:
    spec, report = result.spec, result.report
    file = spec.display(path)
    table = read_table(path, display_name=file)
    report.extend(table.issues)
    headers = {h.lower(): i for i, h in enumerate(table.headers)}
    needed = ("filename", "geographic_mean", "opacity_mean")
    if any(h not in headers for h in needed):
        report.add(
            Severity.ERROR,
            "bad_annotation_file",
            f"expected columns {', '.join(needed)}; found {', '.join(table.headers)}",
            file=file,
            row=1,
            action=Action.FILE_SKIPPED,
        )
        return
    limits = {"geographic_mean": 8.0, "opacity_mean": 6.0}
    for row in table.rows:
        name = row.cells[headers["filename"]].strip()
        scores: dict[str, float] = {}
        for column, high in limits.items():
            text = row.cells[headers[column]].strip()
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not 0 <= value <= high:
                report.add(
                    Severity.WARNING,
                    "bad_severity",
                    f"{column} must be a number in 0..{high:g}; score skipped",
                    file=file,
                    row=row.line,
                    column=column,
                    value=text,
                    action=Action.ANNOTATION_SKIPPED,
                )
                break
            scores[column] = value
        else:
            sha = index.by_name.get(name)
            if sha is None:
                report.add(
                    Severity.WARNING,
                    "annotation_image_missing",
                    f"severity score for {name}, which is not a stored image; skipped",
                    file=file,
                    row=row.line,
                    column="filename",
                    value=name,
                    action=Action.ANNOTATION_SKIPPED,
                )
                continue
            result.annotations.append(
                ScannedAnnotation(
                    sha,
                    "severity",
                    path.stem,
                    file,
                    geographic_mean=scores["geographic_mean"],
                    opacity_mean=scores["opacity_mean"],
                )
            )


def _read_masks(
    directory: Path,
    suffix: str,
    annotator: str,
    result: ScanResult,
    index: _ImageIndex,
    workers: int | None,
    max_pixels: int,
) -> None:
    spec, report = result.spec, result.report
    jobs: list[FileJob] = []
    targets: dict[str, str] = {}
    for entry in sorted(directory.iterdir()):
        if entry.suffix.lower() != ".png" or not entry.name.endswith(suffix):
            continue
        file = spec.display(entry)
        stem = entry.name[: -len(suffix)]
        sha = index.by_stem.get(stem)
        if sha is None:
            report.add(
                Severity.WARNING,
                "annotation_image_missing",
                f"lung mask for image {stem}.*, which is not a stored image; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        targets[file] = sha
        jobs.append(FileJob(str(entry), file, kind="mask"))
    for outcome in process_files(jobs, workers=workers, max_pixels=max_pixels):
        file = outcome.job.name
        if outcome.info is None or outcome.sha256 is None:
            report.add(
                Severity.WARNING,
                outcome.error_code or "undecodable",
                f"lung mask unusable: {outcome.error_message}",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        sha = targets[file]
        size = (outcome.info.width, outcome.info.height)
        if size != index.sizes[sha]:
            report.add(
                Severity.WARNING,
                "mask_size_mismatch",
                f"mask is {size[0]}x{size[1]}, its image is "
                f"{index.sizes[sha][0]}x{index.sizes[sha][1]}; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        result.annotations.append(
            ScannedAnnotation(
                sha,
                "lung_mask",
                annotator,
                file,
                mask_sha256=outcome.sha256,
                mask_path=Path(outcome.job.path),
                mask_values=outcome.mask_values,
            )
        )


def _read_boxes(path: Path, result: ScanResult, index: _ImageIndex) -> None:
    spec, report = result.spec, result.report
    file = spec.display(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = {img["id"]: img for img in doc["images"]}
        categories = {cat["id"]: cat["name"] for cat in doc["categories"]}
        annotations = doc["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add(
            Severity.ERROR,
            "bad_annotation_file",
            f"not a COCO annotation file ({exc.__class__.__name__}: {exc}); skipped",
            file=file,
            action=Action.FILE_SKIPPED,
        )
        return
    for number, item in enumerate(annotations, start=1):
        where = f"annotations[{number - 1}]"
        image = images.get(item.get("image_id"))
        bbox = item.get("bbox")
        if image is None:
            report.add(
                Severity.WARNING,
                "bad_box",
                f"{where}: unknown image_id {item.get('image_id')!r}; skipped",
                file=file,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        name = str(image.get("file_name", ""))
        sha = index.by_name.get(name)
        if sha is None:
            report.add(
                Severity.WARNING,
                "annotation_image_missing",
                f"{where}: lung box for {name}, which is not a stored image; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) for v in bbox)
            or bbox[2] <= 0
            or bbox[3] <= 0
        ):
            report.add(
                Severity.WARNING,
                "bad_box",
                f"{where}: bbox {bbox!r} for {name} is "
                "not [x, y, width, height] with a positive size; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        width, height = index.sizes[sha]
        x, y, w, h = (float(v) for v in bbox)
        if (image.get("width"), image.get("height")) != (width, height) or (
            x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1
        ):
            report.add(
                Severity.WARNING,
                "box_outside_image",
                f"{where}: box {bbox} for {name} does not fit the stored "
                f"{width}x{height} image; skipped",
                file=file,
                value=name,
                action=Action.ANNOTATION_SKIPPED,
            )
            continue
        label = str(categories.get(item.get("category_id"), item.get("category_id")))
        result.annotations.append(
            ScannedAnnotation(sha, "lung_box", path.stem, file, label=label, box=(x, y, w, h))
        )


def _read_annotations(result: ScanResult, workers: int | None, max_pixels: int) -> None:
    folder = result.spec.root / ANNOTATIONS_DIR
    if not folder.is_dir():
        return
    index = _ImageIndex.build(result)
    readers: Mapping[str, Callable[[Path], None]] = {
        "covid-severity-scores.csv": lambda p: _read_severity(p, result, index),
        "lungVAE-masks": lambda p: _read_masks(
            p, "_mask.png", "lungVAE", result, index, workers, max_pixels
        ),
        "v7labs-lung-masks": lambda p: _read_masks(
            p, ".png", "v7labs", result, index, workers, max_pixels
        ),
        "imageannotation_ai_lung_bounding_boxes.json": lambda p: _read_boxes(p, result, index),
    }
    for entry in sorted(folder.iterdir()):
        reader = readers.get(entry.name)
        if reader is None:
            result.report.add(
                Severity.INFO,
                "annotation_not_read",
                f"{entry.name} is not an annotation format this tool reads",
                file=result.spec.display(entry),
                action=Action.FILE_SKIPPED,
            )
            continue
        reader(entry)
    for kind in ("severity", "lung_mask", "lung_box"):
        result.report.counts[f"annotations_{kind}"] = sum(
            1 for a in result.annotations if a.kind == kind
        )
