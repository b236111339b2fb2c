"""The input gate: is this a usable frontal chest X-ray? Decided before any prediction.

Checks, in order (the first failure decides the verdict and its reason):

1. ``decodable``: the file is a PNG or JPEG that :mod:`covidcxr.imaging.decode` decodes
   safely (its :class:`~covidcxr.errors.ImageError` message is the reason).
2. ``size``: the shorter side is at least :attr:`GateRules.min_side_px` (thumbnails and
   icons carry too little detail for any finding).
3. ``greyscale``: the Hasler–Süsstrunk colourfulness of a downscaled RGB copy is at
   most :attr:`GateRules.max_colourfulness` (photos, slides, coloured figures).
   Radiographs are grey; a small coloured arrow or label barely moves the measure.
4. ``frontal_view``: the network's gate head gives ``frontal_xray`` a probability of at
   least :attr:`GateRules.min_frontal_probability`; otherwise the reason names the most
   likely other class (lateral view, CT slice, inverted image, not a medical image).

5. ``grey_levels`` (models that look at the lungs first only): the grey-level histogram
   is not as flat as after histogram equalisation (:func:`grey_level_verdict`), which
   makes their pneumonia model call normal chests pneumonia.
6. ``two_lungs`` (the same models): the lung gate's segmenter found two lung fields, one
   on each side (:func:`lung_fields_verdict`). Their pneumonia model measures the lungs
   it is shown; a whited-out hemithorax is not one of them, and it called most such
   chests normal.

Checks 1-3 are rules on the pixels and run before the network; check 4 needs the
forward pass that also gives the findings, which an image failing it does not get.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.errors import ImageError
from covidcxr.models import gate_data
from covidcxr.models.bundle import GateRules

Verdict = Literal["pass", "fail"]

#: The checks in the order they run.
CHECKS: Final[tuple[str, ...]] = ("decodable", "size", "greyscale", "frontal_view")

#: What each gate-head class is, in words (reasons name the most likely one).
GATE_CLASS_TEXT: Final[dict[str, str]] = {
    "frontal_xray": "frontal chest X-ray",
    "lateral_xray": "lateral view",
    "ct": "CT slice",
    "inverted": "inverted image",
    "not_medical": "not a medical image",
}

FRONTAL_CLASS: Final = "frontal_xray"

#: Below this :func:`covidcxr.models.processing.histogram_flatness` an image is taken for
#: histogram-equalised: it refuses 0.4% of NIH and 0.5% of the collection's frontal
#: images and catches 85-88% of their equalised copies (decision 0072).
EQUALISED_MAX_FLATNESS: Final = 0.04

#: Side of the downscaled copy the colourfulness is measured on: enough pixels for
#: stable statistics, few enough to cost well under a millisecond.
COLOUR_SAMPLE_SIDE: Final = 64

_GREY_MODES: Final = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class GateVerdict:
    """The outcome of the input gate for one image.

    Attributes:
        verdict: ``pass`` or ``fail``.
        reason: why, in words (for a pass, what the gate saw).
        code: machine-readable reason: ``ok``, an ImageError code (``undecodable``,
            ``truncated``, ...), ``tiny``, ``colourful``, or the gate-head class that won
            (``lateral_xray``, ``ct``, ``inverted``, ``not_medical``).
        checks_passed: the checks (of :data:`CHECKS`) the image passed, in order.
        checks_failed: the check that failed (empty on a pass).
        frontal_probability: the gate head's ``frontal_xray`` probability, when reached.
    """

    verdict: Verdict
    reason: str
    code: str
    checks_passed: tuple[str, ...] = ()
    checks_failed: tuple[str, ...] = ()
    frontal_probability: float | None = None

    @property
    def passed(self) -> bool:
        """True when the image may be given to the network's findings."""
        return self.verdict == "pass"


def _fail(code: str, reason: str, check: str, passed: tuple[str, ...]) -> GateVerdict:
    return GateVerdict("fail", reason, code, checks_passed=passed, checks_failed=(check,))


def decode_failure(error: ImageError) -> GateVerdict:
    """The verdict for a file that could not be read or decoded safely."""
    return _fail(error.code, str(error), "decodable", ())


def colourfulness(image: Image.Image | NDArray[np.generic]) -> float:
    """Colourfulness of an image, measured on a small RGB copy.

    The measure is :func:`covidcxr.models.gate_data.colourfulness` (Hasler–Süsstrunk on
    a 0..1 scale: grey 0, "slightly colourful" ~0.06, "moderately" ~0.13), the one the
    gate was trained and tuned with; here it runs on a copy whose shorter side is about
    :data:`COLOUR_SAMPLE_SIDE` pixels (a box reduction: mean colours survive it, and it
    costs well under a millisecond for any radiograph).

    Args:
        image: a decoded Pillow image (any mode) or an array as ``gate_data`` takes.

    Returns:
        The colourfulness, 0 for grey images.
    """
    if isinstance(image, np.ndarray):
        return gate_data.colourfulness(image)
    if image.mode in _GREY_MODES:
        return 0.0
    if image.mode in ("P", "PA"):
        # Palettes cannot be reduced; convert (through RGBA when transparent, as Pillow
        # warns otherwise).
        transparent = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    factor = max(1, min(image.size) // COLOUR_SAMPLE_SIDE)
    small = image.reduce(factor) if factor > 1 else image
    return gate_data.colourfulness(np.asarray(small.convert("RGB")))


def check_rules(image: Image.Image, rules: GateRules) -> GateVerdict:
    """Run the pixel rules (size, colour) on a decoded image.

    Returns:
        A ``fail`` verdict naming the first rule broken, or a provisional ``pass``
        (``decodable``, ``size`` and ``greyscale`` passed) for the gate head to decide.
    """
    width, height = image.size
    passed: tuple[str, ...] = ("decodable",)
    if min(width, height) < rules.min_side_px:
        return _fail(
            "tiny",
            f"image too small: {width}x{height} px, the shorter side is under "
            f"{rules.min_side_px} px",
            "size",
            passed,
        )
    passed += ("size",)
    colour = colourfulness(image)
    if colour > rules.max_colourfulness:
        return _fail(
            "colourful",
            f"image is in colour (colourfulness {colour:.3f} > {rules.max_colourfulness:g}): "
            "a photo, slide or figure, not a radiograph",
            "greyscale",
            passed,
        )
    passed += ("greyscale",)
    return GateVerdict("pass", "pixel checks passed", "ok", checks_passed=passed)


def softmax(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """Softmax over the last axis, computed stably in float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    result: NDArray[np.float64] = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def class_text(name: str) -> str:
    """A gate class in words (unknown classes as their name)."""
    return GATE_CLASS_TEXT.get(name, name.replace("_", " "))


def head_verdict(
    probabilities: Sequence[float] | NDArray[np.floating],
    classes: Sequence[str],
    rules: GateRules,
    prior: GateVerdict,
) -> GateVerdict:
    """Decide the ``frontal_view`` check from the gate head's class probabilities.

    Args:
        probabilities: one probability per class (softmax of the gate logits).
        classes: the gate head's classes, in output order; must include
            ``frontal_xray``.
        rules: the thresholds.
        prior: the verdict of :func:`check_rules` (must be a pass).

    Returns:
        ``pass`` when P(frontal_xray) reaches ``rules.min_frontal_probability``, else
        ``fail`` naming the most likely other class.

    Raises:
        ValueError: ``classes`` lacks ``frontal_xray`` or does not match
            ``probabilities``.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(classes),):
        raise ValueError(
            f"head_verdict: {probs.shape[0] if probs.ndim == 1 else probs.shape} "
            f"probabilities for {len(classes)} gate classes"
        )
    if FRONTAL_CLASS not in classes:
        raise ValueError(f"head_verdict: gate classes {list(classes)} lack {FRONTAL_CLASS!r}")
    if not prior.passed:
        return prior
    frontal_index = list(classes).index(FRONTAL_CLASS)
    p_frontal = float(probs[frontal_index])
    passed = prior.checks_passed
    if p_frontal >= rules.min_frontal_probability:
        return GateVerdict(
            "pass",
            f"usable {class_text(FRONTAL_CLASS)} (gate p={p_frontal:.2f})",
            "ok",
            checks_passed=(*passed, "frontal_view"),
            frontal_probability=p_frontal,
        )
    others = probs.copy()
    others[frontal_index] = -1.0
    best = int(others.argmax())
    name = classes[best]
    return GateVerdict(
        "fail",
        f"most likely {_article(class_text(name))} (gate p={probs[best]:.2f}), not a usable "
        f"frontal chest X-ray (p={p_frontal:.2f} < {rules.min_frontal_probability:g})",
        name,
        checks_passed=passed,
        checks_failed=("frontal_view",),
        frontal_probability=p_frontal,
    )


def _article(text: str) -> str:
    """``lateral view`` -> ``a lateral view``; ``not a medical image`` stays as it is."""
    if text.startswith("not "):
        return text
    return ("an " if text[0].lower() in "aeiou" else "a ") + text


def grey_level_verdict(
    flatness: float, prior: GateVerdict, limit: float = EQUALISED_MAX_FLATNESS
) -> GateVerdict:
    """The ``grey_levels`` check of a lungs-first model, after ``frontal_view``: an image
    whose histogram is as flat as after histogram equalisation (``flatness`` below
    ``limit``) is refused, because its lung-zone model calls most equalised normal chests
    pneumonia. A failed ``prior`` is returned unchanged; a pass gains the check."""
    if not prior.passed:
        return prior
    if flatness < limit:
        return _fail(
            "equalised",
            f"the grey levels look histogram-equalised (histogram flatness {flatness:.3f} "
            f"< {limit:g}): the pneumonia model calls most equalised normal chests "
            "pneumonia (see its card); send the unprocessed export",
            "grey_levels",
            prior.checks_passed,
        )
    return replace(prior, checks_passed=(*prior.checks_passed, "grey_levels"))


def lung_fields_verdict(two_lungs: bool, prior: GateVerdict) -> GateVerdict:
    """The ``two_lungs`` check of a lungs-first model, after ``grey_levels``: an image in
    which the lung gate's segmenter did not find two lung fields, one on each side
    (:func:`covidcxr.models.lungs.two_lungs`), is refused, because the pneumonia model
    judges only the lung it finds. A failed ``prior`` is returned unchanged; a pass gains
    the check."""
    if not prior.passed:
        return prior
    if not two_lungs:
        return _fail(
            "not_two_lungs",
            "the lung segmenter did not find two lung fields, one on each side: one lung "
            "may be whited out (effusion, collapse, consolidation, pneumonectomy) or the "
            "image is one it cannot read; the pneumonia model judges only the lungs it "
            "finds, so it cannot judge this image",
            "two_lungs",
            prior.checks_passed,
        )
    return replace(prior, checks_passed=(*prior.checks_passed, "two_lungs"))
