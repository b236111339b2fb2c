"""Lung Dice per reference annotator, the annotators' agreement, the held-out patients of
a weights folder's own split, and ``covidcxr evaluate-lungs``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import encode, upstream_row, write_metadata, xray_like
from covidcxr.dataset.samples import SampleSet
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.models import lung_dice, lungs, lungs_training
from covidcxr.store.db import Store, open_store

HEIGHT, WIDTH = 96, 80


def v7_mask() -> np.ndarray:
    """Lung in columns 10-39 of rows 20-69, "ignore" (127) in columns 40-44."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[20:70, 10:40] = 255
    mask[20:70, 40:45] = 127
    return mask


def vae_mask() -> np.ndarray:
    """Lung in columns 10-34 of rows 20-69: inside V7's, 1,250 of its 1,500 pixels."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[20:70, 10:35] = 255
    return mask


#: Dice of ``vae_mask`` against ``v7_mask`` with the ignore columns skipped.
AGREEMENT = 2 * 1250 / (1250 + 1500)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten patients: V7 Labs masks for 0-5, lungVAE masks for 3-9 (3-5 have both)."""
    root = tmp_path_factory.mktemp("lung-dice")
    source = root / "tiny"
    (source / "images").mkdir(parents=True)
    for folder in ("lungVAE-masks", "v7labs-lung-masks"):
        (source / "annotations" / folder).mkdir(parents=True)
    rows = []
    for patient in range(10):
        rows.append(upstream_row(patientid=str(patient), filename=f"p{patient}.png"))
        (source / "images" / f"p{patient}.png").write_bytes(encode(xray_like(patient)))
        if patient <= 5:
            path = source / "annotations" / "v7labs-lung-masks" / f"p{patient}.png"
            path.write_bytes(encode(v7_mask()))
        if patient >= 3:
            path = source / "annotations" / "lungVAE-masks" / f"p{patient}_mask.png"
            path.write_bytes(encode(vae_mask()))
    write_metadata(source / "metadata.csv", rows)
    with open_store(f"sqlite:///{root / 's.sqlite'}", root / "data", create=True) as store:
        ingest_source(source, store)
    return root


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{root / 's.sqlite'}", root / "data") as opened:
        yield opened


class DrawsVae:
    """A stand-in segmenter whose mask is always lungVAE's drawing."""

    def segment(self, image: Any) -> np.ndarray:
        return (vae_mask() > 0).astype(np.uint8)


def test_summarise_counts_the_goal_and_resamples_patients() -> None:
    summary = lung_dice.summarise([0.90, 0.96, 1.0], ["a", "b", "c"])
    assert summary["n"] == 3 and summary["median"] == 0.96 and summary["min"] == 0.9
    assert summary["mean"] == pytest.approx(0.9533, abs=1e-4)
    assert summary["share_at_goal"] == pytest.approx(2 / 3, abs=1e-4)
    low, high = summary["mean_ci95"]
    assert 0.9 <= low < summary["mean"] < high <= 1.0
    # one patient's images are drawn together: the interval cannot split them
    assert lung_dice.summarise([0.9, 1.0], ["a", "a"])["mean_ci95"] == [0.95, 0.95]
    assert "mean_ci95" not in lung_dice.summarise([0.9])


def test_summarise_refuses_no_values_and_a_patient_list_of_another_length() -> None:
    with pytest.raises(ValueError, match="no Dice values"):
        lung_dice.summarise([])
    with pytest.raises(ValueError, match="1 patients for 2 values"):
        lung_dice.summarise([0.9, 1.0], ["a"])


def test_samples_say_which_annotator_drew_their_mask(store: Store) -> None:
    sample_set, _ = lungs_training.masked_samples(store)
    annotators = {s.patient: s.mask_annotator for s in sample_set.samples}
    assert annotators["tiny:4"] == "v7labs"  # both: V7 Labs preferred
    assert annotators["tiny:8"] == "lungVAE" and annotators["tiny:0"] == "v7labs"


def test_dice_is_reported_per_annotator(store: Store) -> None:
    sample_set, _ = lungs_training.masked_samples(store)
    chosen = [s for s in sample_set.samples if s.patient in {"tiny:0", "tiny:1", "tiny:8"}]
    scores = lung_dice.dice_by_reference(DrawsVae(), sample_set, chosen)  # type: ignore[arg-type]
    assert list(scores["by_reference"]) == ["v7labs", "lungVAE"]
    assert scores["by_reference"]["lungVAE"]["mean"] == 1.0
    assert scores["by_reference"]["v7labs"]["mean"] == pytest.approx(AGREEMENT, abs=1e-4)
    assert scores["all"]["n"] == 3
    assert scores["all"]["mean"] == pytest.approx((1 + 2 * AGREEMENT) / 3, abs=1e-4)


def test_the_annotators_are_scored_against_each_other(store: Store) -> None:
    sample_set, _ = lungs_training.masked_samples(store)
    agreement = lung_dice.reference_agreement(store, sample_set)
    assert list(agreement) == ["lungVAE vs v7labs"]
    pair = agreement["lungVAE vs v7labs"]
    assert pair["n"] == 3 and pair["mean"] == pytest.approx(AGREEMENT, abs=1e-4)


def test_annotators_masks_of_another_size_are_refused(store: Store, tmp_path: Path) -> None:
    sample_set, _ = lungs_training.masked_samples(store)
    blobs = tmp_path / "blobs"
    for sample in sample_set.samples:  # copy the blobs, then shrink one lungVAE mask
        for sha in (sample.image_sha256, sample.mask_sha256):
            assert sha is not None
            target = blobs / sha[:2] / sha
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((sample_set.blob_root / sha[:2] / sha).read_bytes())
    with store.read() as conn:
        from covidcxr.store import queries

        found = queries.annotations_for(conn, {s.image_sha256 for s in sample_set.samples})
    vae = next(
        (sha, a["mask_sha256"])
        for sha, annotations in sorted(found.items())
        for a in annotations
        if a.get("annotator") == "lungVAE" and len(annotations) > 1
    )
    target = blobs / vae[1][:2] / vae[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(encode(vae_mask()[:50]))
    moved = SampleSet(
        sample_set.task, sample_set.selection, sample_set.samples, sample_set.excluded, blobs
    )
    with pytest.raises(
        MetadataError, match=rf"image {vae[0][:12]}: the lungVAE mask is \(80, 50\)"
    ):
        lung_dice.reference_agreement(store, moved)


def blobs(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A 100 x 100 mask with a filled box (top, bottom, left, right) per argument."""
    mask = np.zeros((100, 100), dtype=np.uint8)
    for top, bottom, left, right in boxes:
        mask[top:bottom, left:right] = 1
    return mask


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (blobs((20, 80, 10, 40), (20, 80, 60, 90)), True),
        (blobs((20, 80, 10, 90)), False),  # one region across the midline
        (blobs((20, 80, 5, 20), (20, 80, 25, 45)), False),  # both on one side
        (blobs((20, 80, 10, 40), (20, 25, 60, 65)), False),  # a speck: 25 px < 4%
        (blobs((20, 80, 10, 40), (20, 40, 60, 80)), True),  # 400 px = 4%
        (blobs(), False),
    ],
)
def test_two_lungs_wants_two_large_regions_one_each_side(mask: np.ndarray, expected: bool) -> None:
    assert lungs.two_lungs(mask) is expected
    assert lungs.two_lungs(mask.astype(bool)) is expected


class DrawsOne:
    """A stand-in segmenter whose mask is one region across the whole chest."""

    def segment(self, image: Any) -> np.ndarray:
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        mask[20:70, 10:70] = 1
        return mask


class DrawsTwo:
    """A stand-in segmenter whose mask is two lungs, one each side."""

    def segment(self, image: Any) -> np.ndarray:
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        mask[20:70, 5:35] = mask[20:70, 45:75] = 1
        return mask


def test_masks_that_are_not_two_lungs_are_counted_per_source(store: Store) -> None:
    frontal = lungs_training.frontal_sample_set(store)
    assert len(frontal) == 10
    plausible = lung_dice.not_two_lungs(DrawsTwo(), frontal)  # type: ignore[arg-type]
    assert plausible == {"tiny": {"images": 10, "not_two_lungs": 0, "examples": [], "share": 0.0}}
    one = lung_dice.not_two_lungs(DrawsOne(), frontal)["tiny"]  # type: ignore[arg-type]
    assert (one["images"], one["not_two_lungs"], one["share"]) == (10, 10, 1.0)
    assert one["examples"] == [s.image_sha256[:12] for s in frontal.samples][:10]


def test_held_out_keeps_the_split_and_counts_patients_it_does_not_know(store: Store) -> None:
    sample_set, split = lungs_training.masked_samples(store)
    test, unknown = lung_dice.held_out(sample_set, split, "test")
    assert unknown == 0 and {s.patient for s in test} == set(split.patients_in("test"))
    dropped = {p: f for p, f in split.assignment.items() if p != test[0].patient}
    smaller = type(split)(**{**split.__dict__, "assignment": dropped})
    again, unknown = lung_dice.held_out(sample_set, smaller, "test")
    assert unknown == sum(1 for s in sample_set.samples if s.patient == test[0].patient)
    assert test[0] not in again and len(again) == len(test) - unknown
    with pytest.raises(MetadataError, match="no fold 'tests'"):
        lung_dice.held_out(sample_set, split, "tests")


@pytest.fixture(scope="module")
def trained(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from covidcxr.cli import main

    out = tmp_path_factory.mktemp("weights") / "lungs-tiny"
    options = ["--size", "32", "--base-channels", "4", "--epochs", "1", "--threads", "1"]
    assert main(["train-lungs", *store_options(root), "--out", str(out), *options]) == 0
    return out


def store_options(root: Path) -> list[str]:
    return ["--db", f"sqlite:///{root / 's.sqlite'}", "--data-dir", str(root / "data")]


def test_train_lungs_records_dice_per_annotator_and_their_agreement(trained: Path) -> None:
    card = lungs.LungSegmenter.load(trained, backend="onnx").card
    assert set(card["test_dice_full_size_by_reference"]) <= {"v7labs", "lungVAE"}
    assert card["test_dice_full_size"]["n"] == sum(
        v["n"] for v in card["test_dice_full_size_by_reference"].values()
    )
    assert card["reference_agreement"]["lungVAE vs v7labs"]["mean"] == pytest.approx(
        AGREEMENT, abs=1e-4
    )


def test_evaluate_lungs_scores_the_weights_own_held_out_patients(
    root: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from covidcxr.cli import main

    assert main(["evaluate-lungs", *store_options(root), "--weights", str(trained), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    card = lungs.LungSegmenter.load(trained, backend="onnx").card
    assert report["model_id"] == "lungs-tiny" and report["left_out_unknown_patients"] == 0
    assert report["all"] == card["test_dice_full_size"]
    assert main(["evaluate-lungs", *store_options(root), "--weights", str(trained)]) == 0
    table = capsys.readouterr().out
    assert "all references" in table and "lungVAE vs v7labs (3 images with both)" in table
    assert "segmented as something other than two lungs" not in table
    options = [*store_options(root), "--weights", str(trained), "--all-frontal"]
    assert main(["evaluate-lungs", *options]) == 0
    assert "tiny: " in capsys.readouterr().out
    assert main(["evaluate-lungs", *options, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_two_lungs"]["tiny"]["images"] == 10


def test_evaluate_lungs_refuses_a_store_without_the_split_patients(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from covidcxr.cli import main

    other = tmp_path / "other"
    source = other / "src"
    (source / "images").mkdir(parents=True)
    (source / "annotations" / "lungVAE-masks").mkdir(parents=True)
    write_metadata(source / "metadata.csv", [upstream_row(patientid="x", filename="x.png")])
    (source / "images" / "x.png").write_bytes(encode(xray_like(1)))
    (source / "annotations" / "lungVAE-masks" / "x_mask.png").write_bytes(encode(vae_mask()))
    with open_store(f"sqlite:///{other / 's.sqlite'}", other / "data", create=True) as store:
        ingest_source(source, store)
    assert main(["evaluate-lungs", *store_options(other), "--weights", str(trained)]) == 2
    assert "no image of the store's masked frontal X-rays belongs to a 'test' patient" in (
        capsys.readouterr().err
    )
