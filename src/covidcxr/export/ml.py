"""ML exports of a selection with its split: WebDataset shards, Hugging Face
imagefolder, torchvision ImageFolder.

The samples are those of a task and selection (:mod:`covidcxr.dataset.samples`),
taken from a split file when one is given (``--split``: its task, selection and folds)
and narrowed by the export command's record filters. Images are written as their
original bytes (no re-encoding); labels, patient, fold and metadata travel with each
image. In every format a binary task's class index is its label (``not_X`` = 0,
``X`` = 1) and folds have the same names (a holdout's ``val`` is ``validation``).
Every export also writes ``covidcxr-export.json`` (task, label names, selection, split
hash, counts, exclusions) and a ``README.md`` dataset card.
"""

from __future__ import annotations

import hashlib
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
from covidcxr.export.card import dataset_card, hf_card_yaml
from covidcxr.imaging.decode import sniff_format
from covidcxr.progress import bar

SHARD_SIZE = 1000
UNSPLIT = "all"
# The fold names of an export: a holdout's val is validation (Hugging Face's name).
EXPORT_FOLD_NAMES = {"val": "validation"}
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
    """The sample's fold as every format names it."""
    if split is None:
        return UNSPLIT
    fold = split.assignment[sample.patient]
    return EXPORT_FOLD_NAMES.get(fold, fold) if split.scheme == "holdout" else fold


def class_names(task: Task) -> tuple[str, str] | None:
    """A binary task's classes, index = label: (``not_X``, ``X``); None otherwise."""
    if task.kind != "binary":
        return None
    leaf = re.sub(r"[^A-Za-z0-9-]+", "_", task.labels[0].split("/")[-1]).strip("_")
    return f"not_{leaf}", leaf


def class_index(sample: Sample) -> int | None:
    """A binary sample's class index (its label), None when the label is unknown."""
    value = sample.labels[0]
    return None if math.isnan(value) else int(value >= 0.5)


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
        **(
            {"label": class_index(sample), "class_names": list(names)}
            if (names := class_names(sample_set.task))
            else {}
        ),
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
    """The stored image's bytes and extension; a missing or damaged blob refuses the
    export (nothing is written) rather than shipping bytes that are not the image."""
    path = sample_set.image_path(sample)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(
            f"export: the image of record {sample.record_id} ({sample.source}:"
            f"{sample.patient}) is missing from the store at {path} ({exc.strerror}); "
            "run covidcxr verify, then re-ingest its source to restore it"
        ) from exc
    if hashlib.sha256(data).hexdigest() != sample.image_sha256:
        raise ExportError(
            f"export: the image of record {sample.record_id} ({sample.source}:"
            f"{sample.patient}) is damaged in the store ({path} no longer hashes to "
            f"{sample.image_sha256[:12]}…); run covidcxr verify, then re-ingest its source"
        )
    fmt = sniff_format(data)
    if fmt not in _EXTENSIONS:  # pragma: no cover - the store only holds PNG/JPEG
        raise ExportError(f"export: image {sample.image_sha256} holds {fmt}, not PNG/JPEG")
    return data, _EXTENSIONS[fmt]


def _manifest(
    out: Path,
    fmt: str,
    sample_set: SampleSet,
    split: Split | None,
    samples: Sequence[Sample],
    hf_yaml: str = "",
) -> None:
    """Write ``covidcxr-export.json`` and the ``README.md`` dataset card."""
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
            "folds": [
                EXPORT_FOLD_NAMES.get(f, f) if split.scheme == "holdout" else f for f in split.folds
            ],
        },
        "samples": len(samples),
        "class_names": list(class_names(sample_set.task) or []) or None,
        "folds": dict(sorted(folds.items())),
        "excluded": dict(sample_set.excluded.most_common()),
        "note": RESEARCH_USE_ONLY,
    }
    (out / "covidcxr-export.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    licences = Counter(str(s.metadata.get("license") or "unknown") for s in samples)
    card = dataset_card(fmt, doc, licences, hf_yaml=hf_yaml)
    (out / "README.md").write_text(card, encoding="utf-8")


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
    ``KEY.json`` (``labels``, and for a binary task ``label`` = class index); at most
    :data:`SHARD_SIZE` samples per shard. Fold k: the shards ``k-*.tar``."""
    sample_set, loaded, samples = _plan(job, task, split)
    by_fold: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_fold[_fold(sample, loaded)].append(sample)
    for fold, members in sorted(by_fold.items()):
        for shard, start in enumerate(range(0, len(members), SHARD_SIZE)):
            with tarfile.open(
                path / f"{fold}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT
            ) as tar:
                for sample in bar(members[start : start + SHARD_SIZE], f"export {fold}"):
                    data, extension = _image(sample_set, sample)
                    key = _key(sample)
                    _add(tar, f"{key}.{extension}", data)
                    meta = _sample_json(sample, sample_set, fold)
                    _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    _manifest(path, "webdataset", sample_set, loaded, samples)
    return len(samples)


def _hf_folder(fold: str) -> str:
    """The folder of a fold: its name, with path separators replaced."""
    return fold.replace("/", "_").replace("\\", "_") or "_"


def write_hf(
    job: ExportJob, path: Path, *, task: str | None = None, split: str | None = None
) -> int:
    """A Hugging Face ``imagefolder`` dataset: ``<fold>/<KEY>.<ext>`` plus
    ``<fold>/metadata.jsonl`` (``file_name``, ``labels``, ``label`` for a binary task,
    fold, patient, metadata), and a ``README.md`` whose configs give the features.

    Load with ``datasets.load_dataset(PATH)``: a binary task's ``label`` is a
    ``ClassLabel`` (``not_X`` = 0, ``X`` = 1). Holdout splits give the splits train,
    validation and test; without a split, one ``train``; k-fold, source and region
    splits give a default config with every sample in ``train`` and one config per
    fold (``load_dataset(PATH, "fold-K")``: train = the other folds, test = fold K).
    """
    sample_set, loaded, samples = _plan(job, task, split)
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in bar(samples, "export hf"):
        fold = _fold(sample, loaded)
        folder = path / _hf_folder("train" if loaded is None else fold)
        folder.mkdir(exist_ok=True)
        data, extension = _image(sample_set, sample)
        name = f"{_key(sample)}.{extension}"
        (folder / name).write_bytes(data)
        meta = _sample_json(sample, sample_set, fold)
        lines[folder.name].append(
            {
                "file_name": name,
                **{k: v for k, v in meta.items() if k not in ("metadata", "class_names")},
                **{
                    f"label_{_safe(n)}": v
                    for n, v in zip(sample_set.label_names, meta["labels"], strict=True)
                },
                **meta["metadata"],
            }
        )
    for folder_name, rows in lines.items():
        text = "\n".join(json.dumps(row, sort_keys=True) for row in rows) + "\n"
        (path / folder_name / "metadata.jsonl").write_text(text, encoding="utf-8")
    rows = [row for folder_rows in lines.values() for row in folder_rows]
    yaml = hf_card_yaml(sorted(lines), loaded, rows, class_names(sample_set.task))
    _manifest(path, "hf", sample_set, loaded, samples, hf_yaml=yaml)
    return len(samples)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def write_imagefolder(
    job: ExportJob, path: Path, *, task: str | None = None, split: str | None = None
) -> int:
    """torchvision ``ImageFolder`` layout: ``<fold>/<class>/<KEY>.<ext>``.

    Needs a single-label (binary) task: the class folders are ``0_not_X`` and ``1_X``,
    so that ``torchvision.datasets.ImageFolder`` (which sorts them) gives class index =
    the task's label. Multi-label and regression tasks are refused (use hf or
    webdataset, which carry label vectors).
    """
    sample_set, loaded, samples = _plan(job, task, split)
    if sample_set.task.kind != "binary":
        raise ExportError(
            f"export: imagefolder needs a binary task (one class per image); "
            f"{sample_set.task.name!r} is {sample_set.task.kind}: use --format hf or "
            "webdataset, or --task covid-vs-other-pneumonia / viral-vs-bacterial"
        )
    names = class_names(sample_set.task)
    assert names is not None
    for sample in bar(samples, "export imagefolder"):
        index = class_index(sample)
        if index is None:  # pragma: no cover - binary tasks leave unknown labels out
            continue
        folder = path / _hf_folder(_fold(sample, loaded)) / f"{index}_{names[index]}"
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
