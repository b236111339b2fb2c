"""Lung segmentation: the U-Net, Dice, training, the shipped weights, heat in the lungs,
and the patient split of the masked images."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import encode, upstream_row, write_metadata, xray_like
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.models import lungs, lungs_training
from covidcxr.store.db import Store, open_store

torch = pytest.importorskip("torch")


def chest_like(height: int = 300, width: int = 260) -> np.ndarray:
    """A bright body on black with two dark, lung-shaped ellipses and a spine between."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    body = ((y - height * 0.55) / (height * 0.5)) ** 2 + ((x - width / 2) / (width * 0.47)) ** 2
    picture = np.where(body < 1, 170.0, 10.0)
    for centre in (0.3, 0.7):
        lung = ((y - height * 0.5) / (height * 0.3)) ** 2 + (
            (x - width * centre) / (width * 0.15)
        ) ** 2
        picture = np.where(lung < 1, 60.0 + 20 * (y / height), picture)
    picture += np.random.default_rng(0).normal(0, 4, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


# -- measures -----------------------------------------------------------------------------


def test_dice_matches_a_hand_computation() -> None:
    predicted = np.zeros((4, 4), dtype=np.uint8)
    reference = np.zeros((4, 4), dtype=np.uint8)
    predicted[0, 0:3] = 1  # 3 pixels
    reference[0, 1:4] = 1  # 3 pixels, 2 shared
    assert lungs.dice(predicted, reference) == pytest.approx(2 * 2 / (3 + 3))
    ignore = np.zeros((4, 4), dtype=bool)
    ignore[0, 3] = True  # the reference's unshared pixel is skipped: 2 * 2 / (3 + 2)
    assert lungs.dice(predicted, reference, ignore) == pytest.approx(4 / 5)
    assert lungs.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        lungs.dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_mass_in_lungs_matches_a_hand_computation() -> None:
    heat = np.array([[1.0, 0.5], [0.25, 0.25]])
    mask = np.array([[1, 0], [1, 0]], dtype=np.uint8)
    assert lungs.mass_in_lungs(heat, mask) == pytest.approx((1.0 + 0.25) / 2.0)
    # A uniform map scores the lung area fraction (the baseline).
    assert lungs.mass_in_lungs(np.ones((2, 2)), mask) == pytest.approx(0.5)
    assert math.isnan(lungs.mass_in_lungs(np.zeros((2, 2)), mask))
    with pytest.raises(ValueError, match="negative"):
        lungs.mass_in_lungs(-heat, mask)
    with pytest.raises(ValueError, match="differ"):
        lungs.mass_in_lungs(heat, np.ones((3, 2)))


def two_lungs_and_a_speck() -> np.ndarray:
    """A 60x60 probability map: two lung blocks (0.9), a far speck (0.8), faint haze (0.3)."""
    probability = np.zeros((60, 60))
    probability[10:50, 8:25] = 0.9  # left lung, 680 px
    probability[10:48, 35:52] = 0.9  # right lung, 646 px
    probability[55:58, 2:5] = 0.8  # a 9 px speck below, far from both
    probability[0:5, 28:32] = 0.3  # below the threshold
    return probability


def test_clean_mask_keeps_two_lungs_and_drops_a_far_speck() -> None:
    probability = two_lungs_and_a_speck()
    mask = lungs.clean_mask(probability)
    assert mask.dtype == np.uint8 and mask.shape == probability.shape
    assert mask[10:50, 8:25].all() and mask[10:48, 35:52].all()  # both lungs kept
    assert not mask[55:58, 2:5].any()  # the speck is gone
    assert int(mask.sum()) == 680 + 646  # nothing else, haze below 0.5 included
    # A lower threshold takes the haze in as one more component, which goes too.
    assert int(lungs.clean_mask(probability, threshold=0.25).sum()) == 680 + 646


def test_clean_mask_leaves_one_or_two_components_and_holes_alone() -> None:
    one = np.zeros((20, 20))
    one[5:15, 5:15] = 1.0
    one[9:11, 9:11] = 0.0  # a hole: kept (hole filling lost Dice on validation)
    assert int(lungs.clean_mask(one).sum()) == 100 - 4
    assert not lungs.clean_mask(np.zeros((8, 8))).any()


def test_letterbox_target_and_back_keep_the_geometry() -> None:
    mask = np.zeros((100, 50), dtype=np.uint8)
    mask[10:60, 5:20] = 255
    mask[70:80, 30:40] = 127
    target = lungs_training.letterbox_target(mask, 20)
    # 100x50 becomes 20x10, pasted at x 5..15: columns outside are padding (0).
    assert set(np.unique(target)) == {0, 1, lungs_training.IGNORE}
    assert not target[:, :5].any() and not target[:, 15:].any()
    back = lungs.unletterbox((target == 1).astype(np.float32), 50, 100)
    assert back.shape == (100, 50)
    assert lungs.dice(back >= 0.5, mask == 255) > 0.8


# -- the network and training -------------------------------------------------------------


def test_unet_keeps_the_input_size() -> None:
    model = lungs.build_unet(base_channels=4, levels=4)
    out = model(torch.zeros(2, 1, 32, 32))
    assert tuple(out.shape) == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="levels"):
        lungs.build_unet(levels=1)


def test_two_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    images = np.stack([xray_like(seed, (32, 32)) for seed in range(4)])
    targets = np.zeros_like(images)
    targets[:, 8:24, 4:14] = 1
    targets[:, 8:24, 18:28] = 1
    settings = lungs_training.TrainSettings(batch_size=4, learning_rate=1e-2, seed=0)
    model = lungs.build_unet(base_channels=4, levels=3)
    before = _loss_of(model, images, targets)
    lungs_training.train_steps(model, images, targets, steps=2, settings=settings)
    assert _loss_of(model, images, targets) < before


def _loss_of(model: torch.nn.Module, images: np.ndarray, targets: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        x = lungs.standardise_tensor(torch, torch.from_numpy(images / 255.0).float()[:, None])
        y = torch.from_numpy(targets.astype(np.float32))[:, None]
        return float(lungs_training._loss(torch, model(x), y))


# -- the shipped weights ------------------------------------------------------------------


def test_each_shipped_segmenter_loads_and_masks_at_the_image_size() -> None:
    """How well they find lungs is measured on real X-rays (``tests/integration``):
    lungs-unet-v2 finds none in a drawn cartoon such as this one; v1 did."""
    picture = chest_like()
    for model_id in ("lungs-unet-v1", "lungs-unet-v2"):
        segmenter = lungs.LungSegmenter.load(lungs.WEIGHTS_ROOT / model_id)
        mask = segmenter.segment(picture)
        assert mask.shape == picture.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        card = segmenter.card
        assert card["model_id"] == model_id and card["test_dice_full_size"]["n"] == 72
        assert card["split_membership_sha256"]
    assert lungs.LungSegmenter.load().card["model_id"] == lungs.MODEL_ID == "lungs-unet-v2"


def test_segment_averages_the_image_and_its_mirror_image() -> None:
    # With flip test-time augmentation the mask of the mirrored image is the mirrored
    # mask, exactly; a single pass of the network is not mirror-symmetric.
    segmenter = lungs.LungSegmenter.load()
    picture = chest_like(height=200, width=170)
    picture[20:60, 10:50] = 255  # break the picture's own symmetry
    mask = segmenter.segment(picture)
    assert np.array_equal(segmenter.segment(picture[:, ::-1].copy()), mask[:, ::-1])
    assert ndimage.label(mask)[1] <= 2  # through clean_mask
    # probability(), whose 0.5 cut the trained lung models use, stays a single pass.
    single = segmenter.probability(picture)
    assert not np.array_equal(segmenter.probability(picture[:, ::-1].copy()), single[:, ::-1])


def test_changed_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lungs"
    lungs_training.save_weights(
        lungs.build_unet(4, 2), folder, {"input_size": 16, "base_channels": 4}
    )
    (folder / "weights.pt").write_bytes(b"changed")
    with pytest.raises(lungs.MetadataError, match="sha256"):
        lungs.LungSegmenter.load(folder)
    with pytest.raises(lungs.MetadataError, match="missing"):
        lungs.LungSegmenter.load(tmp_path / "nothing")


# -- the split ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store (``s.sqlite``, ``data``) of ten patients with lung masks (patients 8 and 9:
    one picture, saved twice), one of them empty."""
    root = tmp_path_factory.mktemp("lungs")
    source = root / "tiny"
    (source / "images").mkdir(parents=True)
    (source / "annotations" / "lungVAE-masks").mkdir(parents=True)
    rows = []
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[20:70, 10:35] = 255
    for patient in range(10):
        name = f"p{patient}.png"
        rows.append(upstream_row(patientid=str(patient), filename=name))
        picture = xray_like(min(patient, 8))
        (source / "images" / name).write_bytes(encode(picture, compress_level=patient % 9))
        lung = mask if patient != 3 else np.zeros_like(mask)
        (source / "annotations" / "lungVAE-masks" / f"p{patient}_mask.png").write_bytes(
            encode(lung)
        )
    write_metadata(source / "metadata.csv", rows)
    with open_store(f"sqlite:///{root / 's.sqlite'}", root / "data", create=True) as store:
        ingest_source(source, store)
    return root


@pytest.fixture
def masked_store(masked_root: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{masked_root / 's.sqlite'}", masked_root / "data") as store:
        yield store


def test_split_of_masked_images_keeps_patients_and_duplicates_on_one_side(
    masked_store: Store,
) -> None:
    sample_set, split = lungs_training.masked_samples(masked_store)
    patients = {s.patient for s in sample_set.samples}
    assert "tiny:3" not in patients  # its mask is empty
    by_fold = {fold: set(split.patients_in(fold)) for fold in split.folds}
    assert not by_fold["train"] & by_fold["test"]
    assert not by_fold["train"] & by_fold["val"] and not by_fold["val"] & by_fold["test"]
    assert split.fold_of("tiny:8") == split.fold_of("tiny:9")  # one picture, one fold
    assert sample_set.excluded["no lung mask (or an empty one)"] >= 1


def test_train_lungs_command_writes_loadable_weights(
    masked_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from covidcxr.cli import main

    store_options = ["--db", f"sqlite:///{masked_root / 's.sqlite'}"]
    store_options += ["--data-dir", str(masked_root / "data")]
    out = tmp_path / "lungs-tiny"
    options = ["--size", "32", "--base-channels", "4", "--epochs", "1", "--threads", "1"]
    assert main(["train-lungs", *store_options, "--out", str(out), *options]) == 0
    assert "all references" in capsys.readouterr().out
    segmenter = lungs.LungSegmenter.load(out)
    assert segmenter.input_size == 32
    assert segmenter.card["split_membership_sha256"]
    assert segmenter.segment(xray_like(1)).shape == (96, 80)


# -- overlays -----------------------------------------------------------------------------


def test_annotated_overlay_draws_the_lungs_the_seen_square_and_a_legend() -> None:
    from covidcxr.models import saliency

    gray = np.full((100, 160), 100, dtype=np.uint8)
    heat = np.zeros((100, 160), dtype=np.float32)
    mask = np.zeros((100, 160), dtype=np.uint8)
    mask[20:60, 40:70] = 1
    rgb = saliency.annotated_overlay(gray, heat, mask)
    assert rgb.shape == (100, 160, 3)
    assert tuple(rgb[20, 50]) == saliency.LUNG_COLOUR  # the outline's top edge
    assert tuple(rgb[40, 55]) == (100, 100, 100)  # inside the lung: untouched
    assert (rgb[:, 30] == saliency.SEEN_COLOUR).all(axis=1).any()  # the square's left side
    assert (rgb[90:, :40] == 0).all(axis=2).any()  # the legend's black box
    assert (rgb[50, 135:] == 100).all()  # away from lines and legend: untouched
    with pytest.raises(ValueError, match="differ"):
        saliency.annotated_overlay(gray, heat, mask[:10])


class FixedSegmenter:
    """Stands in for the shipped segmenter: always the same mask."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, image: object) -> np.ndarray:
        return self.mask


def test_write_overlay_keeps_the_image_size_and_outlines_only_two_lungs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from covidcxr.models import saliency

    gray = chest_like(120, 100)
    heat = np.linspace(0, 1, gray.size, dtype=np.float32).reshape(gray.shape)
    two = np.zeros(gray.shape, dtype=np.uint8)
    two[30:90, 10:40] = two[30:90, 60:90] = 1
    one = np.zeros(gray.shape, dtype=np.uint8)
    one[30:90, 10:90] = 1
    saliency.write_overlay(tmp_path / "none.png", gray, heat, lungs=None)
    drawn = {}
    for name, mask in (("two", two), ("one", one)):
        monkeypatch.setattr(saliency, "_shipped_segmenter", lambda m=mask: FixedSegmenter(m))
        saliency.write_overlay(tmp_path / f"{name}.png", gray, heat)  # segments when it can
        with Image.open(tmp_path / f"{name}.png") as picture:
            assert picture.size == (100, 120)
            drawn[name] = np.asarray(picture)
    with Image.open(tmp_path / "none.png") as plain:
        assert not np.array_equal(drawn["two"], np.asarray(plain))  # the outline
        assert np.array_equal(drawn["one"], np.asarray(plain))  # not two lungs: none


def test_found_two_lungs_looks_only_at_the_image_inside_the_letterbox() -> None:
    # a 200 x 100 image letterboxed to 64 px fills rows 16-47; its lungs are in there
    probability = np.zeros((64, 64), dtype=np.float32)
    probability[20:44, 5:28] = probability[20:44, 36:59] = 0.9
    assert lungs.found_two_lungs(probability, 200, 100)
    one = probability.copy()
    one[20:44, 36:59] = 0.2  # below the 0.5 cut: one lung
    assert not lungs.found_two_lungs(one, 200, 100)
    # lungs of 3.5% of the square each, 7% of the image: the share is of the image
    small = np.zeros((64, 64), dtype=np.float32)
    small[24:36, 8:20] = small[24:36, 40:52] = 0.9
    assert lungs.found_two_lungs(small, 200, 100)
    assert not lungs.two_lungs(small >= 0.5)


def test_letterbox_area_cuts_a_letterboxed_array_to_the_image() -> None:
    from PIL import Image

    from covidcxr.dataset.loading import preprocess_image
    from covidcxr.models.lungs import letterbox_area

    wide = Image.fromarray(np.full((50, 200), 200, dtype=np.uint8))
    square = preprocess_image(wide, 64, crop="pad")
    rows, columns = letterbox_area(200, 50, 64)
    assert (rows.stop - rows.start, columns.stop - columns.start) == (16, 64)
    assert (square[rows, columns] > 0).all()  # the image
    assert not square[: rows.start].any() and not square[rows.stop :].any()  # the bars
