"""WebDataset, Hugging Face imagefolder and ImageFolder exports of a selection with its split."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.cli import main
from covidcxr.dataset.samples import build_samples
from covidcxr.dataset.splits import make_split
from covidcxr.dataset.tasks import get_task
from covidcxr.export import ExportError, ExportWriteError, export_records, ml
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.db import Store, open_store
from covidcxr.store.queries import RecordFilter
from synthetic_sources import Synthetic, build_synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    return build_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def store(synthetic: Synthetic, tmp_path: Path) -> Iterator[Store]:
    with synthetic.open_copy(tmp_path) as opened:
        yield opened


@pytest.fixture
def holdout(store: Store, tmp_path: Path) -> Path:
    samples = build_samples(store, get_task("covid-vs-other-pneumonia"))
    with store.read() as conn:
        split = make_split(samples, conn, scheme="holdout", seed=1)
    return split.save(tmp_path / "split.csv")


def blob_hashes(out: Path) -> set[str]:
    return {
        hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.rglob("*")
        if p.suffix in (".png", ".jpg")
    }


def test_webdataset_shards_per_fold(store: Store, holdout: Path, tmp_path: Path) -> None:
    out = tmp_path / "wds"
    written = export_records(store, out, "webdataset", split=str(holdout))
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "val-000000.tar",
    ]
    samples = list(ml.iter_webdataset(out))
    assert len(samples) == written
    for key, image, meta in samples:
        assert "." not in key and meta["key"] == key
        assert hashlib.sha256(image).hexdigest() == meta["image_sha256"]
        assert meta["label_names"] == ["Pneumonia/Viral/COVID-19"]
        assert meta["labels"] in ([0.0], [1.0])
        assert meta["fold"] in ("train", "val", "test")
    folds_by_patient: dict[str, set[str]] = {}
    for _, _, meta in samples:
        folds_by_patient.setdefault(meta["patient"], set()).add(meta["fold"])
    assert all(len(folds) == 1 for folds in folds_by_patient.values())
    manifest = json.loads((out / "covidcxr-export.json").read_text())
    assert manifest["samples"] == written and manifest["split"]["scheme"] == "holdout"
    assert manifest["task"]["name"] == "covid-vs-other-pneumonia"


def test_webdataset_is_reproducible(store: Store, holdout: Path, tmp_path: Path) -> None:
    export_records(store, tmp_path / "a", "webdataset", split=str(holdout))
    export_records(store, tmp_path / "b", "webdataset", split=str(holdout))
    for shard in (tmp_path / "a").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_hf_imagefolder_layout(store: Store, holdout: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    written = export_records(store, out, "hf", split=str(holdout))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["test", "train", "validation"]
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (out / split / "metadata.jsonl").read_text().splitlines()
    ]
    assert len(rows) == written
    for row in rows:
        folder = {"train": "train", "val": "validation", "test": "test"}[row["fold"]]
        assert (out / folder / row["file_name"]).is_file()
        assert row["label_Pneumonia_Viral_COVID_19"] == row["labels"][0]
        assert row["view"] in ("PA", "AP")


def test_kfold_split_goes_into_one_hf_split_with_a_fold_column(
    store: Store, tmp_path: Path
) -> None:
    samples = build_samples(store, get_task("findings"))
    with store.read() as conn:
        split = make_split(samples, conn, scheme="kfold", folds=3, seed=0)
    path = split.save(tmp_path / "kfold.csv")
    out = tmp_path / "hf"
    export_records(store, out, "hf", split=str(path))
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["train"]
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    assert all(len(r["labels"]) == 11 and set(r["labels"]) <= {0.0, 1.0, None} for r in rows)
    assert sum(r["label_Pneumonia_Viral_COVID_19"] == 1.0 for r in rows) >= 20


def test_imagefolder_for_a_binary_task(store: Store, holdout: Path, tmp_path: Path) -> None:
    out = tmp_path / "imagefolder"
    written = export_records(store, out, "imagefolder", split=str(holdout))
    classes = {p.parent.name for p in out.rglob("*.png")} | {
        p.parent.name for p in out.rglob("*.jpg")
    }
    assert classes == {"COVID_19", "not_COVID_19"}
    assert sum(1 for p in out.rglob("*") if p.suffix in (".png", ".jpg")) == written
    covid = len(list(out.glob("*/COVID_19/*")))
    assert 0 < covid < written


def test_imagefolder_refuses_multilabel_tasks(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="imagefolder needs a binary task"):
        export_records(store, tmp_path / "x", "imagefolder", task="findings")
    assert not (tmp_path / "x").exists()


def test_without_split_and_with_record_filters(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "one-source"
    written = export_records(
        store, out, "webdataset", task="findings", selection=RecordFilter(sources=["beta"])
    )
    metas = [meta for _, _, meta in ml.iter_webdataset(out)]
    assert written == len(metas) > 0
    assert {m["source"] for m in metas} == {"beta"} and {m["fold"] for m in metas} == {"all"}
    assert [p.name for p in out.glob("*.tar")] == ["all-000000.tar"]


def test_error_mid_export_leaves_the_old_output(
    store: Store, holdout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "wds"
    export_records(store, out, "webdataset", split=str(holdout))
    before = sorted(p.name for p in out.iterdir())
    calls = {"n": 0}
    original = ml._image

    def failing(*args: object) -> tuple[bytes, str]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk full")
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ml, "_image", failing)
    with pytest.raises(ExportWriteError, match="disk full"):
        export_records(store, out, "webdataset", split=str(holdout))
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_task_must_match_the_split(store: Store, holdout: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="differs from the split's task"):
        export_records(store, tmp_path / "x", "hf", split=str(holdout), task="findings")


def test_cli_exports(
    synthetic: Synthetic, holdout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{synthetic.database}"
    out = tmp_path / "cli-hf"
    code = main(
        [
            "export",
            "--format",
            "hf",
            "--out",
            str(out),
            "--split",
            str(holdout),
            "--db",
            db,
            "--data-dir",
            str(synthetic.data_dir),
        ]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert (out / "covidcxr-export.json").is_file()
    code = main(
        [
            "export",
            "--format",
            "imagefolder",
            "--out",
            str(tmp_path / "bad"),
            "--task",
            "findings",
            "--db",
            db,
            "--data-dir",
            str(synthetic.data_dir),
        ]
    )
    assert code == 2 and "binary task" in capsys.readouterr().err
    code = main(
        [
            "export",
            "--format",
            "upstream-csv",
            "--out",
            str(tmp_path / "x.csv"),
            "--split",
            str(holdout),
            "--db",
            db,
            "--data-dir",
            str(synthetic.data_dir),
        ]
    )
    assert code == 2 and "does not take 'split'" in capsys.readouterr().err


def test_unknown_labels_are_null_not_zero(make_collection: MakeCollection, tmp_path: Path) -> None:
    rows = [upstream_row(patientid="1", filename="p1.png", finding="Pneumonia")]
    root = make_collection(rows, images={"p1.png": encode(xray_like(1))}, annotations=False)
    with open_store(f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "d") as small:
        ingest_source(root, small)
        export_records(small, tmp_path / "hf", "hf", task="findings")
    text = (tmp_path / "hf" / "train" / "metadata.jsonl").read_text()
    (row,) = [json.loads(x) for x in text.splitlines()]
    assert row["label_Pneumonia"] == 1.0
    assert row["label_Pneumonia_Viral"] is None and row["label_No_Finding"] == 0.0
