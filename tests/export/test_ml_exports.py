"""WebDataset, Hugging Face imagefolder and ImageFolder exports of a selection with its split."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        "validation-000000.tar",
    ]
    samples = list(ml.iter_webdataset(out))
    assert len(samples) == written
    for key, image, meta in samples:
        assert "." not in key and meta["key"] == key
        assert hashlib.sha256(image).hexdigest() == meta["image_sha256"]
        assert meta["label_names"] == ["Pneumonia/Viral/COVID-19"]
        assert meta["labels"] in ([0.0], [1.0]) and meta["label"] == meta["labels"][0]
        assert meta["class_names"] == ["not_COVID-19", "COVID-19"]
        assert meta["fold"] in ("train", "validation", "test")
    folds_by_patient: dict[str, set[str]] = {}
    for _, _, meta in samples:
        folds_by_patient.setdefault(meta["patient"], set()).add(meta["fold"])
    assert all(len(folds) == 1 for folds in folds_by_patient.values())
    manifest = json.loads((out / "covidcxr-export.json").read_text())
    assert manifest["samples"] == written and manifest["split"]["scheme"] == "holdout"
    assert manifest["task"]["name"] == "covid-vs-other-pneumonia"
    assert manifest["split"]["folds"] == ["train", "validation", "test"]


def test_webdataset_loads_in_webdataset(store: Store, holdout: Path, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "wds"
    written = export_records(store, out, "webdataset", split=str(holdout))
    shards = sorted(str(p) for p in out.glob("*.tar"))
    with warnings.catch_warnings():
        # 2026-12: webdataset leaves its shard files to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        loaded = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
        gc.collect()
    assert len(loaded) == written
    for sample in loaded:
        image = sample.get("png", sample.get("jpg"))
        assert image.size[0] > 0
        assert sample["json"]["label"] == int(sample["json"]["labels"][0])


def test_every_ml_export_has_a_dataset_card(store: Store, holdout: Path, tmp_path: Path) -> None:
    for fmt in ("webdataset", "hf", "imagefolder"):
        out = tmp_path / fmt
        written = export_records(store, out, fmt, split=str(holdout))
        card = (out / "README.md").read_text()
        assert "Research use only, not a diagnosis" in card
        assert "covid-vs-other-pneumonia" in card and f"samples: {written}" in card
        assert "0 = `not_COVID-19`, 1 = `COVID-19`" in card
        assert "| validation |" in card and "CC BY 4.0" in card
        assert (out / "covidcxr-export.json").is_file()


def load_hf(path: Path, tmp_path: Path, config: str | None = None) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset(str(path), config, cache_dir=str(tmp_path / "hf-cache"))


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
        assert (out / row["fold"] / row["file_name"]).is_file()
        assert row["label_Pneumonia_Viral_COVID_19"] == row["labels"][0] == row["label"]
        assert row["view"] in ("PA", "AP")


def test_hf_loads_in_datasets_with_a_class_label(
    store: Store, holdout: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    written = export_records(store, out, "hf", split=str(holdout))
    loaded = load_hf(out, tmp_path)
    assert sorted(loaded) == ["test", "train", "validation"]
    assert sum(len(part) for part in loaded.values()) == written
    label = loaded["train"].features["label"]
    assert label.names == ["not_COVID-19", "COVID-19"]
    for name, part in loaded.items():
        assert set(part["fold"]) == {name}
        for row in part:
            assert row["image"].size[0] > 0
            assert row["label"] == int(row["labels"][0])


def test_kfold_hf_export_has_one_config_per_fold(store: Store, tmp_path: Path) -> None:
    samples = build_samples(store, get_task("findings"))
    with store.read() as conn:
        split = make_split(samples, conn, scheme="kfold", folds=3, seed=0)
    path = split.save(tmp_path / "kfold.csv")
    out = tmp_path / "hf"
    written = export_records(store, out, "hf", split=str(path))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1", "2"]
    rows = [
        json.loads(x) for f in "012" for x in (out / f / "metadata.jsonl").read_text().splitlines()
    ]
    assert all(len(r["labels"]) == 11 and set(r["labels"]) <= {0.0, 1.0, None} for r in rows)
    assert sum(r["label_Pneumonia_Viral_COVID_19"] == 1.0 for r in rows) >= 20
    everything = load_hf(out, tmp_path)
    assert list(everything) == ["train"] and len(everything["train"]) == written
    assert set(everything["train"]["fold"]) == {"0", "1", "2"}
    fold_one = load_hf(out, tmp_path, "fold-1")
    assert set(fold_one["test"]["fold"]) == {"1"}
    assert set(fold_one["train"]["fold"]) == {"0", "2"}
    assert len(fold_one["train"]) + len(fold_one["test"]) == written


def test_imagefolder_for_a_binary_task(store: Store, holdout: Path, tmp_path: Path) -> None:
    out = tmp_path / "imagefolder"
    written = export_records(store, out, "imagefolder", split=str(holdout))
    classes = {p.parent.name for p in out.rglob("*.png")} | {
        p.parent.name for p in out.rglob("*.jpg")
    }
    assert classes == {"1_COVID-19", "0_not_COVID-19"}
    assert sum(1 for p in out.rglob("*") if p.suffix in (".png", ".jpg")) == written
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["test", "train", "validation"]


def test_imagefolder_loads_in_torchvision_with_index_equal_to_label(
    store: Store, holdout: Path, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    out = tmp_path / "imagefolder"
    written = export_records(store, out, "imagefolder", split=str(holdout))
    by_key = {meta["key"]: meta for _, _, meta in _webdataset_metas(store, holdout, tmp_path)}
    total = 0
    for fold in ("train", "validation", "test"):
        folder = datasets.ImageFolder(str(out / fold))
        assert folder.class_to_idx == {"0_not_COVID-19": 0, "1_COVID-19": 1}
        for (file, index), (image, _) in zip(folder.samples, folder, strict=True):
            assert image.size[0] > 0
            assert index == by_key[Path(file).stem]["label"]
        total += len(folder)
    assert total == written


def _webdataset_metas(
    store: Store, holdout: Path, tmp_path: Path
) -> list[tuple[str, bytes, dict[str, Any]]]:
    export_records(store, tmp_path / "labels", "webdataset", split=str(holdout))
    return list(ml.iter_webdataset(tmp_path / "labels"))


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


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.parametrize("fmt", ["webdataset", "hf", "imagefolder"])
def test_a_damaged_blob_refuses_the_export_naming_the_record(
    synthetic: Synthetic, holdout: Path, tmp_path: Path, damage: str, fmt: str
) -> None:
    # A private copy of the blobs too: the module's store shares them.
    shutil.copytree(synthetic.data_dir, tmp_path / "private")
    shutil.copyfile(synthetic.database, tmp_path / "private.sqlite")
    with open_store(f"sqlite:///{tmp_path / 'private.sqlite'}", tmp_path / "private") as store:
        samples = build_samples(store, get_task("covid-vs-other-pneumonia"))
        victim = samples.samples[0]
        blob = samples.image_path(victim)
        if damage == "truncated":
            blob.write_bytes(blob.read_bytes()[:100])
        else:
            blob.unlink()
        out = tmp_path / "export"
        expected = "damaged in the store" if damage == "truncated" else "missing from the store"
        with pytest.raises(ExportError, match=expected) as info:
            export_records(store, out, fmt, split=str(holdout), task="covid-vs-other-pneumonia")
    assert f"record {victim.record_id}" in str(info.value)
    assert "covidcxr verify" in str(info.value)
    assert not out.exists()


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
    with open_store(f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "d", create=True) as small:
        ingest_source(root, small)
        export_records(small, tmp_path / "hf", "hf", task="findings")
    text = (tmp_path / "hf" / "train" / "metadata.jsonl").read_text()
    (row,) = [json.loads(x) for x in text.splitlines()]
    assert row["label_Pneumonia"] == 1.0
    assert row["label_Pneumonia_Viral"] is None and row["label_No_Finding"] == 0.0
