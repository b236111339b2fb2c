"""The input gate: pixel rules (size, colour), the gate head's decision, verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import ImageError
from covidcxr.models import gate
from covidcxr.models.bundle import GATE_CLASSES, GateRules

RULES = GateRules(min_side_px=128, max_colourfulness=0.08, min_frontal_probability=0.5)


def radiograph_like(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    """A smooth grey picture with a bright 'mediastinum' and dark 'lungs'."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    body = 120 + 80 * np.exp(-(((x - 0.5) / 0.12) ** 2))
    lungs = -50 * (np.exp(-(((x - 0.3) / 0.1) ** 2 + ((y - 0.5) / 0.25) ** 2)))
    lungs += -50 * (np.exp(-(((x - 0.7) / 0.1) ** 2 + ((y - 0.5) / 0.25) ** 2)))
    noise = rng.normal(0, 6, (height, width))
    pixels: NDArray[np.uint8] = np.clip(body + lungs + noise, 0, 255).astype(np.uint8)
    return pixels


def photo_like(height: int, width: int, seed: int = 0) -> NDArray[np.uint8]:
    """A colourful picture: sky, grass and a red object."""
    rng = np.random.default_rng(seed)
    rgb = np.zeros((height, width, 3), dtype=np.float64)
    rgb[: height // 2] = (90, 150, 230)  # sky
    rgb[height // 2 :] = (60, 170, 60)  # grass
    rgb[height // 3 : height // 2, width // 3 : width // 2] = (220, 40, 40)
    rgb += rng.normal(0, 10, rgb.shape)
    result: NDArray[np.uint8] = np.clip(rgb, 0, 255).astype(np.uint8)
    return result


def test_colourfulness_grey_is_zero_in_any_form() -> None:
    grey = radiograph_like(300, 260)
    assert gate.colourfulness(Image.fromarray(grey)) == 0.0
    assert gate.colourfulness(grey) == 0.0
    # Radiographs saved as RGB (common in the collection) are grey too.
    as_rgb = Image.fromarray(grey).convert("RGB")
    assert gate.colourfulness(as_rgb) == pytest.approx(0.0, abs=1e-9)
    assert gate.colourfulness(Image.fromarray(grey).convert("I;16")) == 0.0


def test_colourfulness_of_a_photo_is_high() -> None:
    photo = Image.fromarray(photo_like(400, 600))
    value = gate.colourfulness(photo)
    assert value > 0.2
    # The downscaled measure agrees with the full-resolution one.
    assert value == pytest.approx(gate.gate_data.colourfulness(np.asarray(photo)), rel=0.05)
    # Palette images are measured like their RGB.
    assert gate.colourfulness(photo.convert("P")) == pytest.approx(value, rel=0.1)


def test_a_small_coloured_annotation_keeps_an_xray_grey() -> None:
    rgb = np.repeat(radiograph_like(400, 400)[:, :, None], 3, axis=2)
    rgb[20:40, 20:60] = (255, 0, 0)  # a red marker in a corner
    assert gate.colourfulness(Image.fromarray(rgb)) < RULES.max_colourfulness


def test_rules_pass_a_grey_image_of_usable_size() -> None:
    verdict = gate.check_rules(Image.fromarray(radiograph_like(256, 300)), RULES)
    assert verdict.passed
    assert verdict.checks_passed == ("decodable", "size", "greyscale")
    assert verdict.checks_failed == ()


def test_rules_refuse_a_tiny_image() -> None:
    verdict = gate.check_rules(Image.fromarray(radiograph_like(100, 300)), RULES)
    assert verdict.verdict == "fail"
    assert verdict.code == "tiny"
    assert "300x100 px" in verdict.reason
    assert "128 px" in verdict.reason
    assert verdict.checks_failed == ("size",)
    assert verdict.checks_passed == ("decodable",)
    # Exactly the minimum is enough.
    assert gate.check_rules(Image.fromarray(radiograph_like(128, 128)), RULES).passed


def test_rules_refuse_a_colourful_image() -> None:
    verdict = gate.check_rules(Image.fromarray(photo_like(300, 400)), RULES)
    assert verdict.verdict == "fail"
    assert verdict.code == "colourful"
    assert "colour" in verdict.reason
    assert verdict.checks_failed == ("greyscale",)
    assert verdict.checks_passed == ("decodable", "size")


def test_decode_failure_keeps_the_image_error() -> None:
    error = ImageError("decode_image: 'x.png' is truncated or corrupt", code="truncated")
    verdict = gate.decode_failure(error)
    assert verdict.verdict == "fail"
    assert verdict.code == "truncated"
    assert verdict.reason == str(error)
    assert verdict.checks_failed == ("decodable",)


def _probabilities(**by_class: float) -> list[float]:
    rest = (1.0 - sum(by_class.values())) / (len(GATE_CLASSES) - len(by_class))
    return [by_class.get(name, rest) for name in GATE_CLASSES]


PRIOR = gate.GateVerdict("pass", "pixel checks passed", "ok", ("decodable", "size", "greyscale"))


def test_gate_head_passes_a_frontal_xray() -> None:
    verdict = gate.head_verdict(_probabilities(frontal_xray=0.9), GATE_CLASSES, RULES, PRIOR)
    assert verdict.passed
    assert verdict.frontal_probability == pytest.approx(0.9)
    assert verdict.checks_passed == ("decodable", "size", "greyscale", "frontal_view")
    assert "frontal chest X-ray" in verdict.reason


@pytest.mark.parametrize(
    ("winner", "words"),
    [
        ("lateral_xray", "a lateral view"),
        ("ct", "a CT slice"),
        ("inverted", "an inverted image"),
        ("not_medical", "not a medical image"),
    ],
)
def test_gate_head_names_the_most_likely_other_class(winner: str, words: str) -> None:
    probabilities = _probabilities(frontal_xray=0.3, **{winner: 0.6})
    verdict = gate.head_verdict(probabilities, GATE_CLASSES, RULES, PRIOR)
    assert verdict.verdict == "fail"
    assert verdict.code == winner
    assert f"most likely {words}" in verdict.reason
    assert "p=0.30 < 0.5" in verdict.reason
    assert verdict.checks_failed == ("frontal_view",)
    assert verdict.frontal_probability == pytest.approx(0.3)


def test_gate_head_fails_when_frontal_is_most_likely_but_below_the_threshold() -> None:
    # 0.4 frontal, 0.15 each other: frontal wins the argmax but not the threshold.
    verdict = gate.head_verdict(_probabilities(frontal_xray=0.4), GATE_CLASSES, RULES, PRIOR)
    assert verdict.verdict == "fail"
    assert verdict.code in GATE_CLASSES[1:]


def test_gate_head_follows_the_bundle_class_order() -> None:
    classes = ("not_medical", "frontal_xray", "ct", "lateral_xray", "inverted")
    verdict = gate.head_verdict([0.05, 0.1, 0.05, 0.7, 0.1], classes, RULES, PRIOR)
    assert verdict.code == "lateral_xray"
    assert verdict.frontal_probability == pytest.approx(0.1)


def test_gate_head_keeps_an_earlier_failure() -> None:
    prior = gate.GateVerdict("fail", "too small", "tiny", ("decodable",), ("size",))
    verdict = gate.head_verdict(_probabilities(frontal_xray=0.99), GATE_CLASSES, RULES, prior)
    assert verdict is prior


def test_gate_head_refuses_classes_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="lack 'frontal_xray'"):
        gate.head_verdict([0.5, 0.5], ("ct", "lateral_xray"), RULES, PRIOR)
    with pytest.raises(ValueError, match="2 probabilities for 5 gate classes"):
        gate.head_verdict([0.5, 0.5], GATE_CLASSES, RULES, PRIOR)


def test_softmax_is_stable() -> None:
    probabilities = gate.softmax(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities[0, 0] == pytest.approx(1.0)
    assert np.allclose(probabilities[1], 1 / 3)


# --- grey levels: histogram equalisation (lungs-first models) -----------------------------


def passed_frontal() -> gate.GateVerdict:
    return gate.GateVerdict(
        "pass", "frontal", "ok", checks_passed=("decodable", "size", "greyscale", "frontal_view")
    )


def test_a_flat_histogram_is_refused_as_equalised_naming_the_check() -> None:
    verdict = gate.grey_level_verdict(0.021, passed_frontal())
    assert not verdict.passed
    assert verdict.code == "equalised"
    assert verdict.checks_failed == ("grey_levels",)
    assert verdict.checks_passed == passed_frontal().checks_passed
    assert "0.021 < 0.04" in verdict.reason
    assert "unprocessed export" in verdict.reason


def test_an_ordinary_histogram_passes_and_gains_the_check() -> None:
    verdict = gate.grey_level_verdict(gate.EQUALISED_MAX_FLATNESS, passed_frontal())
    assert verdict.passed
    assert verdict.checks_passed[-1] == "grey_levels"
    assert verdict.frontal_probability == passed_frontal().frontal_probability


def test_the_grey_level_check_keeps_an_earlier_failure() -> None:
    earlier = gate.GateVerdict("fail", "lateral", "lateral_xray", checks_failed=("frontal_view",))
    assert gate.grey_level_verdict(0.0, earlier) is earlier


def test_an_image_without_two_lung_fields_is_refused_naming_the_check() -> None:
    prior = gate.grey_level_verdict(0.5, passed_frontal())
    verdict = gate.lung_fields_verdict(False, prior)
    assert not verdict.passed and verdict.code == "not_two_lungs"
    assert verdict.checks_failed == ("two_lungs",)
    assert verdict.checks_passed == prior.checks_passed
    assert "whited out" in verdict.reason and "cannot judge this image" in verdict.reason
    passed = gate.lung_fields_verdict(True, prior)
    assert passed.passed and passed.checks_passed == (*prior.checks_passed, "two_lungs")
    earlier = gate.GateVerdict("fail", "lateral", "lateral_xray", checks_failed=("frontal_view",))
    assert gate.lung_fields_verdict(False, earlier) is earlier
