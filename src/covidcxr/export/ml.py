"""ML exports of a selection with its split: WebDataset shards, Hugging Face
imagefolder, torchvision ImageFolder.

The samples are those of a task and selection (:mod:`covidcxr.dataset.samples`),
taken from a split file when one is given (``--split``: its task, selection and folds)
and narrowed by the export command's record filters. Images are written as their
original bytes (no re-encoding); labels, patient, fold and metadata travel with each
image. Every export also writes ``covidcxr-export.json``: task, label names,
selection, split hash, counts and exclusions, so the output documents itself.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from covidcxr import RESEARCH_USE_ONLY, __version__
from covidcxr.dataset.samples import Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.splits import Split, load_split
from covidcxr.dataset.tasks import Task, get_task, task_of
from covidcxr.export import ExportError, ExportJob
from covidcxr.imaging.decode import sniff_format

SHARD_SIZE = 1000
UNSPLIT = "all"
# Hugging Face recognises these folder names as splits.
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg"}


def _plan(
    job: ExportJob, task: str | None, split: str | None
) -> tuple[SampleSet, Split | None, list[Sample]]:
    """The samples to export (task, selection, split), in sample order."""
    if job.store is None:
        raise ExportError("export: image exports need the store (its blobs), not a connection")
    loaded = load_split(split) if split else None
    if loaded is not None:
        chosen: Task = task_of(loaded.task)
        if task is not None and task != chosen.name:
            raise ExportError(
                f"export: --task {task} differs from the split's task "
                f"{chosen.name}; leave --task out to use the split's"
            )
        selection = Selection.from_dict(loaded.selection)
    else:
        chosen = get_task(task or "findings")
        selection = Selection()
    sample_set = build_samples(job.store, chosen, selection)
    wanted = {row["record_id"] for row in job.rows}
    samples = [s for s in sample_set.samples if s.record_id in wanted]
    if loaded is not None:
        samples = [s for s in samples if s.patient in loaded.assignment]
    return sample_set, loaded, samples


def _fold(sample: Sample, split: Split | None) -> str:
    return split.assignment[sample.patient] if split is not None else UNSPLIT


def _key(sample: Sample) -> str:
    # WebDataset keys must not contain dots; record id + hash prefix is unique.
    return f"r{sample.record_id:07d}-{sample.image_sha256[:12]}"


def _label_json(values: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def _sample_json(sample: Sample, sample_set: SampleSet, fold: str) -> dict[str, Any]:
    return {
        "key": _key(sample),
        "labels": _label_json(sample.labels),
        "label_names": list(sample_set.label_names),
        "task": sample_set.task.name,
        "fold": fold,
        "patient": sample.patient,
        "source": sample.source,
        "record_id": sample.record_id,
        "image_sha256": sample.image_sha256,
        "severity": list(sample.severity) if sample.severity else None,
        "metadata": {k: v for k, v in sample.metadata.items() if v is not None},
        "note": RESEARCH_USE_ONLY,
    }


def _image(sample_set: SampleSet, sample: Sample) -> tuple[bytes, str]:
    data = sample_set.image_path(sample).read_bytes()
    fmt = sniff_format(data)
    if fmt not in _EXTENSIONS:  # pragma: no cover - the store only holds PNG/JPEG
        raise ExportError(f"export: image {sample.image_sha256} holds {fmt}, not PNG/JPEG")
    return data, _EXTENSIONS[fmt]


def _manifest(
    out: Path, fmt: str, sample_set: SampleSet, split: Split | None, samples: Sequence[Sample]
) -> None:
    folds = Counter(_fold(s, split) for s in samples)
    doc = {
        "format": fmt,
        "covidcxr_version": __version__,
        "task": sample_set.task.as_dict(),
        "selection": sample_set.selection.as_dict(),
        "split": None
        if split is None
        else {
            "scheme": split.scheme,
            "seed": split.seed,
            "membership_sha256": split.membership_sha256,
        },
        "samples": len(samples),
        "folds": dict(sorted(folds.items())),
        "excluded": dict(sample_set.excluded.most_common()),
        "note": RESEARCH_USE_ONLY,
    }
    (out / "covidcxr-export.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards: same input, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    job: ExportJob, path: Path, *, task: str | None = None, split: str | None = None
) -> int:
    """WebDataset tar shards, ``<fold>-<n>.tar``, each sample as ``KEY.png|jpg`` and
    ``KEY.json``; at most :data:`SHARD_SIZE` samples per shard."""
    sample_set, loaded, samples = _plan(job, task, split)
    by_fold: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_fold[_fold(sample, loaded)].append(sample)
    for fold, members in sorted(by_fold.items()):
        for shard, start in enumerate(range(0, len(members), SHARD_SIZE)):
            with tarfile.open(
                path / f"{fold}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT
            ) as tar:
                for sample in members[start : start + SHARD_SIZE]:
                    data, extension = _image(sample_set, sample)
                    key = _key(sample)
                    _add(tar, f"{key}.{extension}", data)
                    meta = _sample_json(sample, sample_set, fold)
                    _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    _manifest(path, "webdataset", sample_set, loaded, samples)
    return len(samples)


def _hf_folder(fold: str, split: Split | None) -> str:
    if split is None:
        return "train"
    if split.scheme == "holdout":
        return HF_SPLIT_NAMES.get(fold, fold)
    return "train"  # k-fold/source/region: one split, the fold is a column


def write_hf(
    job: ExportJob, path: Path, *, task: str | None = None, split: str | None = None
) -> int:
    """A Hugging Face ``imagefolder`` dataset: ``<split>/<KEY>.<ext>`` plus
    ``<split>/metadata.jsonl`` (``file_name``, labels, fold, patient, metadata).

    Holdout splits become train/validation/test folders; other schemes write one
    ``train`` folder with a ``fold`` column. Load with
    ``datasets.load_dataset("imagefolder", data_dir=PATH)``.
    """
    sample_set, loaded, samples = _plan(job, task, split)
    lines: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        fold = _fold(sample, loaded)
        folder = path / _hf_folder(fold, loaded)
        folder.mkdir(exist_ok=True)
        data, extension = _image(sample_set, sample)
        name = f"{_key(sample)}.{extension}"
        (folder / name).write_bytes(data)
        meta = _sample_json(sample, sample_set, fold)
        row = {
            "file_name": name,
            **{k: v for k, v in meta.items() if k != "metadata"},
            **{
                f"label_{_safe(n)}": v
                for n, v in zip(sample_set.label_names, meta["labels"], strict=True)
            },
            **meta["metadata"],
        }
        lines[folder.name].append(json.dumps(row, sort_keys=True))
    for folder_name, rows in lines.items():
        (path / folder_name / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    _manifest(path, "hf", sample_set, loaded, samples)
    return len(samples)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def write_imagefolder(
    job: ExportJob, path: Path, *, task: str | None = None, split: str | None = None
) -> int:
    """torchvision ``ImageFolder`` layout: ``<fold>/<class>/<KEY>.<ext>``.

    Needs a single-label (binary) task: the classes are the label name and
    ``not_<label>``. Multi-label and regression tasks are refused (use hf or
    webdataset, which carry label vectors).
    """
    sample_set, loaded, samples = _plan(job, task, split)
    if sample_set.task.kind != "binary":
        raise ExportError(
            f"export: imagefolder needs a binary task (one class per image); "
            f"{sample_set.task.name!r} is {sample_set.task.kind}: use --format hf or "
            "webdataset, or --task covid-vs-other-pneumonia / viral-vs-bacterial"
        )
    positive = _safe(sample_set.label_names[0].split("/")[-1])
    for sample in samples:
        label = positive if sample.labels[0] >= 0.5 else f"not_{positive}"
        folder = path / _fold(sample, loaded) / label
        folder.mkdir(parents=True, exist_ok=True)
        data, extension = _image(sample_set, sample)
        (folder / f"{_key(sample)}.{extension}").write_bytes(data)
    _manifest(path, "imagefolder", sample_set, loaded, samples)
    return len(samples)


def iter_webdataset(path: Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Read back the shards written by :func:`write_webdataset` (key, image, json)."""
    for shard in sorted(path.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = defaultdict(dict)
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                handle = tar.extractfile(member)
                if handle is not None:
                    members[key][extension] = handle.read()
        for key, parts in members.items():
            image = parts.get("png", parts.get("jpg", b""))
            yield key, image, json.loads(parts["json"])
