"""The torch Dataset: torchxrayvision-style items, masks, cache, workers, determinism."""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conftest import encode, upstream_row, write_metadata, xray_like
from covidcxr.dataset.cache import CACHE_VERSION
from covidcxr.dataset.loading import load_image, load_mask, normalise
from covidcxr.dataset.samples import Sample, SampleSet, Selection, build_samples
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import ImageError, MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store.blobs import sha256_hex
from covidcxr.store.db import Store, open_store

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader

from covidcxr.dataset import torch_dataset
from covidcxr.dataset.torch_dataset import CollectionDataset

SIZE = 32
EVERY_ROW = Selection(views=("any",), modalities=("any",), one_per_image=False)


def _collection(root: Path) -> Path:
    """Five images, one with a lung mask and severity, one with an unspecific finding."""
    (root / "images").mkdir(parents=True)
    rows = [
        upstream_row(patientid="1", offset="0", filename="p1.png"),
        upstream_row(patientid="1", offset="3", filename="p1-day3.jpg", view="AP"),
        upstream_row(patientid="2", sex="F", age="34", finding="Streptococcus", filename="p2.png"),
        upstream_row(patientid="3", sex="", age="", finding="No Finding", filename="p2.png"),
        upstream_row(patientid="4", offset="", finding="Pneumonia", filename="p4.jpg"),
        upstream_row(patientid="5", view="L", filename="p5.png"),
        upstream_row(patientid="6", finding="todo", filename="p6.png"),
    ]
    images = {
        "p1.png": encode(xray_like(1)),
        "p1-day3.jpg": encode(xray_like(2, (300, 260)), "JPEG", quality=90),
        "p2.png": encode(np.stack([xray_like(3)] * 3, axis=-1)),
        "p4.jpg": encode(xray_like(4, (120, 200)), "JPEG", quality=90),
        "p5.png": encode(xray_like(5)),
        "p6.png": encode(xray_like(6)),
    }
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    write_metadata(root / "metadata.csv", rows)
    folder = root / "annotations"
    (folder / "lungVAE-masks").mkdir(parents=True)
    (folder / "covid-severity-scores.csv").write_text(
        "## severity scores,,\nfilename,geographic_mean,opacity_mean\np1.png,4.5,3.0\n",
        encoding="utf-8",
    )
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[20:70, 10:35] = 255
    mask[20:70, 45:70] = 255
    (folder / "lungVAE-masks" / "p1_mask.png").write_bytes(encode(mask))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("torch-dataset")
    source = _collection(root / "tiny")
    with open_store(f"sqlite:///{root / 'store.sqlite'}", root / "data", create=True) as opened:
        ingest_source(source, opened)
        yield opened


@pytest.fixture(scope="module")
def sample_set(store: Store) -> SampleSet:
    return build_samples(store, get_task("findings"), Selection(one_per_image=False))


def _dataset(samples: SampleSet, tmp_path: Path, **options: Any) -> CollectionDataset:
    options.setdefault("cache_dir", tmp_path / "cache")
    options.setdefault("size", SIZE)
    return CollectionDataset(samples, **options)


def _by_file(dataset: CollectionDataset) -> dict[str, int]:
    return {name: i for i, name in enumerate(dataset.csv["filename"])}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


# -- items --------------------------------------------------------------------------------


def test_samples_selected_as_expected(sample_set: SampleSet) -> None:
    # Lateral and "todo" rows are left out and counted; the shared p2.png is kept twice.
    files = [s.metadata["filename"] for s in sample_set.samples]
    assert files == ["p1.png", "p1-day3.jpg", "p2.png", "p2.png", "p4.jpg"]


def test_item_keys_dtypes_shapes(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    item = dataset[0]
    assert set(item) == {
        "idx",
        "img",
        "lab",
        "mask",
        "has_mask",
        "severity",
        "patient",
        "image_id",
        "record_id",
        "source",
        "view",
        "modality",
        "sex",
        "age_years",
        "offset_days",
        "finding",
    }
    assert item["idx"] == 0
    assert item["img"].dtype == torch.float32
    assert item["img"].shape == (1, SIZE, SIZE)
    assert item["lab"].dtype == torch.float32
    assert item["lab"].shape == (len(dataset.pathologies),)
    assert item["mask"].dtype == torch.float32
    assert item["mask"].shape == (1, SIZE, SIZE)
    assert item["severity"].dtype == torch.float32
    assert item["severity"].shape == (2,)
    assert isinstance(item["record_id"], int)
    assert len(item["image_id"]) == 64
    assert item["patient"] == "tiny:1"
    assert item["source"] == "tiny"
    assert (item["view"], item["modality"], item["sex"]) == ("PA", "X-ray", "M")
    assert item["age_years"] == 60.0
    assert item["offset_days"] == 0.0
    assert item["finding"] == "COVID-19"


def test_img_is_xrv_normalised_load_image(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    for i in range(len(dataset)):
        img = dataset[i]["img"]
        assert float(img.min()) >= -1024.0
        assert float(img.max()) <= 1024.0
        blob = sample_set.image_path(sample_set.samples[i])
        expected = normalise(load_image(blob, SIZE))[None]
        np.testing.assert_array_equal(img.numpy(), expected)


def test_nan_labels_stay_unknown(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    viral = dataset.pathologies.index("Pneumonia/Viral")
    pneumonia = dataset.pathologies.index("Pneumonia")
    lab = dataset[_by_file(dataset)["p4.jpg"]]["lab"]
    assert math.isnan(float(lab[viral]))
    assert float(lab[pneumonia]) == 1.0
    np.testing.assert_array_equal(
        np.isnan(dataset.labels), np.isnan(np.array([s.labels for s in sample_set.samples]))
    )
    assert dataset.labels.dtype == np.float32


def test_mask_for_the_annotated_image_only(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    index = _by_file(dataset)
    item = dataset[index["p1.png"]]
    assert item["has_mask"] is True
    mask = item["mask"][0].numpy()
    assert set(np.unique(mask)) == {0.0, 1.0}
    # 96x80 -> crop rows 8..88 -> x 32/80: lungs at rows 5..25, cols 4..14 and 18..28.
    assert mask[6:24, 5:13].all()
    assert mask[6:24, 19:27].all()
    assert not mask[:, 15:17].any()
    sha = dataset.mask_sha256(index["p1.png"])
    assert sha is not None
    expected = load_mask(sample_set.blob_root / sha[:2] / sha, SIZE)
    np.testing.assert_array_equal(mask, expected)
    other = dataset[index["p2.png"]]
    assert other["has_mask"] is False
    assert not other["mask"].any()
    assert dataset.mask_sha256(index["p2.png"]) is None


def test_masks_off(sample_set: SampleSet, tmp_path: Path) -> None:
    item = _dataset(sample_set, tmp_path, masks=False)[0]
    assert "mask" not in item
    assert "has_mask" not in item


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_items_normalise_on_the_device_to_the_same_values(
    sample_set: SampleSet, tmp_path: Path, workers: int
) -> None:
    floats = _dataset(sample_set, tmp_path)
    raw = _dataset(sample_set, tmp_path, normalise=False)
    assert raw.normalise is False
    loader = DataLoader(raw, batch_size=5, num_workers=workers)
    (batch,) = list(loader)
    (expected,) = list(DataLoader(floats, batch_size=5))
    assert batch["img"].dtype == torch.uint8
    assert batch["mask"].dtype == torch.uint8
    assert batch["img"].shape == expected["img"].shape == (5, 1, SIZE, SIZE)
    assert torch.equal(torch_dataset.normalise_batch(batch["img"]), expected["img"])
    assert torch.equal(batch["mask"].float(), expected["mask"])
    assert torch.equal(batch["has_mask"], expected["has_mask"])
    for key in ("lab", "severity", "idx", "record_id"):
        assert _same(batch[key], expected[key]), key
    assert batch["image_id"] == expected["image_id"]


def test_normalise_batch_matches_normalise_on_every_grey_level() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    got = torch_dataset.normalise_batch(torch.from_numpy(levels))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), normalise(levels))
    with pytest.raises(TypeError, match="expected uint8"):
        torch_dataset.normalise_batch(got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_normalise_batch_on_a_gpu_gives_the_same_bits() -> None:
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(64, 1, 1, 1)
    on_gpu = torch_dataset.normalise_batch(levels.cuda()).cpu()
    np.testing.assert_array_equal(on_gpu.numpy(), normalise(levels.numpy()))


def test_uint8_items_refuse_transforms(sample_set: SampleSet, tmp_path: Path) -> None:
    for option in ("transform", "data_aug"):
        with pytest.raises(ValueError, match="normalise=False hands out uint8 pixels"):
            _dataset(sample_set, tmp_path, normalise=False, **{option: _halve})


def test_severity_and_unknown_metadata(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    index = _by_file(dataset)
    assert dataset[index["p1.png"]]["severity"].tolist() == [4.5, 3.0]
    assert torch.isnan(dataset[index["p1-day3.jpg"]]["severity"]).all()
    unknown = dataset[3]  # patient 3: no sex, no age
    assert unknown["patient"] == "tiny:3"
    assert unknown["sex"] == ""
    assert math.isnan(unknown["age_years"])
    assert math.isnan(dataset[index["p4.jpg"]]["offset_days"])


def test_negative_and_out_of_range_indices(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    assert dataset[-1]["record_id"] == dataset[len(dataset) - 1]["record_id"]
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]


# -- subsets, order, workers ------------------------------------------------------------


def test_indices_keep_the_given_order(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path, indices=[4, 0, 2])
    assert len(dataset) == 3
    expected = [sample_set.samples[i].record_id for i in (4, 0, 2)]
    assert [dataset[i]["record_id"] for i in range(3)] == expected
    assert [dataset[i]["idx"] for i in range(3)] == [0, 1, 2]
    assert dataset.sample_indices.tolist() == [4, 0, 2]
    assert dataset.labels.shape == (3, len(dataset.pathologies))
    with pytest.raises(ValueError, match=r"indices \[5, -1\] are outside the 5 samples"):
        _dataset(sample_set, tmp_path, indices=[0, 5, -1])
    with pytest.raises(ValueError, match="must be integers"):
        _dataset(sample_set, tmp_path, indices=[True, False, True, False, True])
    assert len(_dataset(sample_set, tmp_path, indices=np.array([3, 3], dtype=np.uint8))) == 2
    assert len(_dataset(sample_set, tmp_path, indices=[])) == 0


def _batches(dataset: CollectionDataset, workers: int) -> list[dict[str, Any]]:
    loader = DataLoader(dataset, batch_size=2, num_workers=workers)
    return list(loader)


def test_two_workers_give_the_same_batches_in_the_same_order(
    sample_set: SampleSet, tmp_path: Path
) -> None:
    # Each run starts from an empty cache: workers decode and write concurrently.
    single = _batches(_dataset(sample_set, tmp_path / "a"), 0)
    double = _batches(_dataset(sample_set, tmp_path / "b"), 2)
    assert len(single) == len(double) == 3
    for one, two in zip(single, double, strict=True):
        assert one.keys() == two.keys()
        for key in one:
            assert _same(one[key], two[key]), key
    assert single[0]["img"].shape == (2, 1, SIZE, SIZE)
    assert single[0]["patient"] == ["tiny:1", "tiny:1"]
    assert single[0]["age_years"].dtype == torch.float64


def test_getitems_matches_getitem(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path / "a")
    batch = dataset.__getitems__([4, 2, 2, 0, -1])
    plain = _dataset(sample_set, tmp_path / "b", cache_dir=None)
    for item, i in zip(batch, [4, 2, 2, 0, 4], strict=True):
        expected = plain[i]
        assert item.keys() == expected.keys()
        for key in item:
            assert _same(item[key], expected[key]), key


def test_a_file_that_fails_to_decode_says_which(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path, cache_dir=None)
    blob = sample_set.blob_root / dataset.image_sha256(1)[:2] / dataset.image_sha256(1)
    saved = blob.read_bytes()
    try:
        blob.write_bytes(b"not an image")
        with pytest.raises(ImageError, match="not a PNG or JPEG"):
            dataset[1]
        assert dataset[0]["idx"] == 0  # the others still load
    finally:
        blob.write_bytes(saved)


# -- the cache --------------------------------------------------------------------------


def test_second_pass_reads_the_cache_only(
    sample_set: SampleSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = _dataset(sample_set, tmp_path)
    first = [dataset[i] for i in range(len(dataset))]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(torch_dataset, "load_image", refuse)
    monkeypatch.setattr(torch_dataset, "load_mask", refuse)
    again = [dataset[i] for i in range(len(dataset))]
    batch = dataset.__getitems__(list(range(len(dataset))))
    for a, b, c in zip(first, again, batch, strict=True):
        assert torch.equal(a["img"], b["img"])
        assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["img"], c["img"])
    assert dataset.cache_dir is not None
    folders = sorted(p.name for p in dataset.cache_dir.iterdir())
    version = CACHE_VERSION
    assert folders == [f"v{version}-{SIZE}-center", f"v{version}-{SIZE}-center-mask"]


def test_no_cache_writes_nothing(
    sample_set: SampleSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Counter[str]()
    original = torch_dataset.load_image

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["load"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_dataset, "load_image", counting)
    dataset = _dataset(sample_set, tmp_path, cache_dir=None)
    assert dataset.cache_dir is None
    dataset[0]
    dataset[0]
    assert calls["load"] == 2
    assert not (sample_set.blob_root.parent / "cache").exists()
    assert not list(tmp_path.iterdir())


def test_default_cache_is_beside_the_blobs(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = CollectionDataset(sample_set, size=SIZE)
    assert dataset.cache_dir == sample_set.blob_root.parent / "cache"


# -- transforms and randomness ----------------------------------------------------------


def _halve(image: np.ndarray) -> np.ndarray:
    assert isinstance(image, np.ndarray)  # like xrv, transform sees numpy
    return image[:, ::2, ::2]


def _random_flip(image: Any) -> Any:
    assert isinstance(image, torch.Tensor)  # data_aug sees the tensor
    return image.flip(-1) if float(torch.rand(())) < 0.5 else image


def test_transform_and_data_aug_apply_to_image_and_mask(
    sample_set: SampleSet, tmp_path: Path
) -> None:
    plain = _dataset(sample_set, tmp_path)
    augmented = _dataset(sample_set, tmp_path, transform=_halve, data_aug=_random_flip)
    index = _by_file(plain)["p1.png"]
    base = plain[index]
    numpy_state = np.random.get_state()[1].copy()
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = augmented[index]
        assert item["img"].shape == (1, SIZE // 2, SIZE // 2)
        halved_img = base["img"][:, ::2, ::2]
        halved_mask = base["mask"][:, ::2, ::2]
        flipped = torch.equal(item["img"], halved_img.flip(-1))
        assert flipped or torch.equal(item["img"], halved_img)
        # The mask got the same draw as the image.
        assert torch.equal(item["mask"], halved_mask.flip(-1) if flipped else halved_mask)
        seen.add(flipped)
    assert seen == {True, False}
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    unmasked = augmented[_by_file(plain)["p2.png"]]
    assert unmasked["mask"].shape == unmasked["img"].shape
    assert not unmasked["mask"].any()


def test_augmentation_is_reproducible_from_torch_seed(
    sample_set: SampleSet, tmp_path: Path
) -> None:
    dataset = _dataset(sample_set, tmp_path, data_aug=_random_flip)

    def run() -> list[Any]:
        torch.manual_seed(123)
        return [dataset[i]["img"] for i in range(len(dataset))]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


# -- compatibility and summaries --------------------------------------------------------


def test_xrv_attributes_and_summary(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path)
    assert dataset.pathologies == list(get_task("findings").labels)
    assert len(dataset) == 5
    assert dataset.views == ["frontal"]
    totals = dataset.totals()
    assert totals["Pneumonia"] == {1.0: 4, 0.0: 1}
    assert totals["Pneumonia/Viral"] == {0.0: 2, 1.0: 2}  # p4's is unknown
    rows = dataset.csv
    assert len(rows) == 5
    assert rows.iloc[0]["filename"] == "p1.png"
    assert rows.iloc[0]["geographic_mean"] == 4.5
    assert bool(rows.iloc[0]["has_mask"]) is True
    assert math.isnan(rows.iloc[1]["geographic_mean"])
    assert pd.isna(rows.iloc[3]["sex"])
    assert list(rows["patientid"]) == dataset.patients
    assert list(rows["record_id"]) == [dataset[i]["record_id"] for i in range(5)]
    assert list(rows["sex_male"]) == [sex == "M" for sex in rows["sex"]]
    assert list(rows["sex_female"]) == [sex == "F" for sex in rows["sex"]]
    np.testing.assert_array_equal(rows["offset_day_int"], rows["offset_days"])
    summary = dataset.summary()
    assert summary["samples"] == 5
    assert summary["patients"] == 4
    assert summary["with_mask"] == 1
    assert summary["with_severity"] == 1
    assert summary["excluded"] == dict(sample_set.excluded)
    assert summary["sample_set"]["samples"] == 5
    json.dumps(summary)
    text = repr(dataset)
    assert "num_samples=5" in text
    for reason, count in sample_set.excluded.items():
        assert f"{reason}: {count}" in text
    assert dataset.patients == ["tiny:1", "tiny:1", "tiny:2", "tiny:3", "tiny:4"]


def test_torchxrayvision_tools_take_the_dataset(sample_set: SampleSet, tmp_path: Path) -> None:
    xrv = pytest.importorskip("torchxrayvision")
    state = np.random.get_state()  # MergeDataset reseeds numpy's global generator
    try:
        dataset = _dataset(sample_set, tmp_path, masks=False)
        images = [dataset[i]["image_id"] for i in range(len(dataset))]
        subset = xrv.datasets.SubsetDataset(dataset, [0, 2])
        assert len(subset) == 2
        assert subset[1]["image_id"] == images[2]
        assert list(subset.csv["image_id"]) == [images[0], images[2]]
        assert "SubsetDataset num_samples=2" in subset.string()
        pneumonia = xrv.datasets.FilterDataset(dataset, labels=["Pneumonia"])
        assert len(pneumonia) == 4
        assert all(pneumonia[i]["lab"][0] == 1 for i in range(4))
        merged = xrv.datasets.MergeDataset([dataset, _dataset(sample_set, tmp_path, masks=False)])
        assert len(merged) == 10
        assert list(merged.csv["patientid"]) == dataset.patients * 2
        assert merged[7]["image_id"] == images[2]
        # relabel_dataset swaps in a float64 array; samples keep float32 labels.
        xrv.datasets.relabel_dataset(["Pneumonia/Viral", "Pneumonia", "Effusion"], dataset, True)
        assert dataset.pathologies == ["Pneumonia/Viral", "Pneumonia", "Effusion"]
        label = dataset[0]["lab"]
        assert label.dtype == torch.float32
        assert label.shape == (3,)
        assert label[1] == 1
        assert torch.isnan(label[2])
    finally:
        np.random.set_state(state)


def test_from_store(store: Store, tmp_path: Path) -> None:
    by_name = CollectionDataset.from_store(store, "findings", EVERY_ROW, size=SIZE, cache_dir=None)
    assert len(by_name) == 6  # the lateral row joins; "todo" stays out
    by_task = CollectionDataset.from_store(
        store, get_task("covid-vs-other-pneumonia"), cache_dir=None
    )
    assert by_task.pathologies == ["Pneumonia/Viral/COVID-19"]
    assert by_task.size == 224
    assert by_task[0]["img"].shape == (1, 224, 224)
    with pytest.raises(MetadataError, match="unknown task"):
        CollectionDataset.from_store(store, "nope")


def test_pickles_without_a_database(sample_set: SampleSet, tmp_path: Path) -> None:
    dataset = _dataset(sample_set, tmp_path, transform=_halve)
    copy = pickle.loads(pickle.dumps(dataset))
    for key, value in dataset[2].items():
        assert _same(value, copy[2][key]), key
    assert len(pickle.dumps(dataset)) < 20_000


def test_bad_size_and_crop(sample_set: SampleSet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive int"):
        _dataset(sample_set, tmp_path, size=0)
    with pytest.raises(ValueError, match="crop"):
        _dataset(sample_set, tmp_path, crop="corner")


# -- against torchxrayvision on real images ---------------------------------------------


@pytest.mark.shared_data
@pytest.mark.slow
def test_matches_torchxrayvision_on_real_images(covid_dir: Path, tmp_path: Path) -> None:
    xrv = pytest.importorskip("torchxrayvision")
    from torchvision.transforms import Compose

    state = np.random.get_state()  # COVID19_Dataset reseeds numpy's global generator
    try:
        reference = xrv.datasets.COVID19_Dataset(
            imgpath=str(covid_dir / "images"),
            csvpath=str(covid_dir / "metadata.csv"),
            views=["PA", "AP"],
            transform=Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)]),
        )
    finally:
        np.random.set_state(state)
    # One image of each kind the collection holds: JPEG L/RGB, PNG L/RGB/RGBA.
    from PIL import Image

    chosen: dict[tuple[str, str], int] = {}
    for i, name in enumerate(reference.csv["filename"]):
        path = covid_dir / "images" / name
        if not path.is_file():
            continue
        with Image.open(path) as image:
            chosen.setdefault((str(image.format), image.mode), i)
    assert len(chosen) >= 4
    blobs = tmp_path / "blobs"
    samples = []
    for record_id, i in enumerate(chosen.values()):
        data = (covid_dir / "images" / reference.csv["filename"].iloc[i]).read_bytes()
        sha = sha256_hex(data)
        (blobs / sha[:2]).mkdir(parents=True, exist_ok=True)
        (blobs / sha[:2] / sha).write_bytes(data)
        samples.append(Sample(record_id, sha, f"x:{record_id}", "x", (0.0,)))
    sample_set = SampleSet(
        get_task("covid-vs-other-pneumonia"), Selection(), samples, Counter(), blobs
    )
    ours = CollectionDataset(sample_set, cache_dir=tmp_path / "cache", masks=False)
    for position, i in enumerate(chosen.values()):
        theirs = np.asarray(reference[i]["img"], dtype=np.float64)
        mine = ours[position]["img"].numpy().astype(np.float64)
        assert mine.shape == theirs.shape == (1, 224, 224)
        correlation = np.corrcoef(mine.ravel(), theirs.ravel())[0, 1]
        assert correlation > 0.99, (reference.csv["filename"].iloc[i], correlation)
