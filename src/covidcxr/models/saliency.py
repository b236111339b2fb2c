"""Heatmaps of what drove a prediction: CAM (no gradients) and Grad-CAM (captum).

Our networks end in ``feature map A (C, h, w) -> global average pool -> linear head``
(see :mod:`covidcxr.models.network`), so for finding ``k`` with head weights ``w_k``:

* the class activation map is ``CAM_k = sum_c w_kc * A_c`` (one small matrix product,
  no gradients, the same in the torch and the torch-free ONNX path), and
* Grad-CAM's channel weights are the spatial means of ``d logit_k / d A_c`` which is
  ``w_kc / (h * w)`` everywhere, so ``Grad-CAM_k = ReLU(CAM_k) / (h * w)``.

After the ReLU and the scaling to [0, 1] that every displayed map gets, the two are the
same map; ``tests/models/test_predict.py`` checks this against captum's
``LayerGradCam``, the maintained implementation the torch path uses by default.

Maps live on the network's input, the centre square of the image (torchxrayvision's
``XRayCenterCrop``); :func:`upsample_to_image` puts them back on the whole image (zero
outside the square, which the network never saw). Overlays show the whole image with a
colour map built here (no plotting library), a legend, a dashed line around the square
the network saw, and the lung outline when the lung segmenter can run (torch).

Only :func:`grad_cam` needs torch (and captum); it imports them when called.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from covidcxr.atomic import atomic_output
from covidcxr.dataset.loading import center_crop_box
from covidcxr.errors import MetadataError, MissingExtraError

if TYPE_CHECKING:
    import torch

    from covidcxr.models.lungs import LungSegmenter
    from covidcxr.models.network import CXRModel

log = logging.getLogger(__name__)

#: Anchor colours of the overlay's colour map (dark blue, blue, cyan, yellow, red at
#: 0, 0.25, 0.5, 0.75, 1): a "jet"-like scale whose hot end stands out on grey.
_ANCHORS: Final = np.array(
    [[0, 0, 128], [0, 64, 255], [0, 224, 224], [255, 224, 0], [200, 0, 0]], dtype=np.float64
)


def _colour_map() -> NDArray[np.uint8]:
    positions = np.linspace(0.0, 1.0, len(_ANCHORS))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, positions, _ANCHORS[:, i]) for i in range(3)], axis=1)
    result: NDArray[np.uint8] = np.rint(table).astype(np.uint8)
    return result


#: 256 RGB colours, index = heat * 255.
COLOUR_MAP: Final[NDArray[np.uint8]] = _colour_map()

#: Opacity of the colour at full heat; cold regions show the radiograph untouched.
OVERLAY_ALPHA: Final = 0.5
#: Colour of the lung outline and of the dashed border of the square the network saw.
LUNG_COLOUR: Final = (0, 255, 0)
SEEN_COLOUR: Final = (255, 255, 255)


def class_activation_maps(
    features: NDArray[np.floating], weights: NDArray[np.floating]
) -> NDArray[np.float32]:
    """CAM for every finding: ``cam[b, k] = sum_c weights[k, c] * features[b, c]``.

    Args:
        features: the backbone's feature maps, ``(B, C, h, w)``.
        weights: the findings head's weight matrix, ``(K, C)``.

    Returns:
        ``(B, K, h, w)`` float32 maps (before ReLU; the head's bias is left out, it
        shifts every position alike).

    Raises:
        ValueError: the channel counts differ.
    """
    if features.ndim != 4 or weights.ndim != 2 or weights.shape[1] != features.shape[1]:
        raise ValueError(
            f"class_activation_maps: features {features.shape} and weights {weights.shape} "
            "do not fit: expected (B, C, h, w) and (K, C)"
        )
    maps = np.einsum(
        "kc,bchw->bkhw", weights.astype(np.float32), features.astype(np.float32, copy=False)
    )
    result: NDArray[np.float32] = maps.astype(np.float32, copy=False)
    return result


def normalise_map(raw: NDArray[np.floating]) -> NDArray[np.float32]:
    """ReLU, then scale to [0, 1] by the maximum (an all-zero map stays zero)."""
    positive = np.maximum(np.asarray(raw, dtype=np.float32), np.float32(0))
    peak = float(positive.max()) if positive.size else 0.0
    if peak > 0.0:
        positive /= np.float32(peak)
    return positive


def upsample_to_image(heat: NDArray[np.floating], width: int, height: int) -> NDArray[np.float32]:
    """Put a map of the network's input back on the whole ``width x height`` image.

    The map covers the centre square (:func:`covidcxr.dataset.loading.center_crop_box`);
    it is resized bilinearly onto that square, and the rest of the image is 0.

    Args:
        heat: ``(h, w)`` map (normally from :func:`normalise_map`).
        width: the original image's width in pixels.
        height: the original image's height in pixels.

    Returns:
        ``(height, width)`` float32 map.
    """
    left, top, right, bottom = center_crop_box(width, height)
    side = right - left
    small = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    square = np.asarray(small.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    if side == width and side == height:
        return np.ascontiguousarray(square)
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:bottom, left:right] = square
    return canvas


def overlay(gray: NDArray[np.uint8], heat: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Blend a [0, 1] heat map over a grey image with :data:`COLOUR_MAP`.

    The colour's opacity grows with the heat (up to :data:`OVERLAY_ALPHA`), so cold
    regions keep the radiograph's own grey levels.

    Args:
        gray: ``(H, W)`` uint8 image.
        heat: ``(H, W)`` map in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    if gray.shape != heat.shape:
        raise ValueError(f"overlay: image {gray.shape} and heat map {heat.shape} differ")
    level = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colour = COLOUR_MAP[np.rint(level * 255).astype(np.intp)].astype(np.float32)
    alpha = (level * np.float32(OVERLAY_ALPHA))[:, :, None]
    base = gray.astype(np.float32)[:, :, None]
    blended = base * (1 - alpha) + colour * alpha
    result: NDArray[np.uint8] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


def _outline(mask: NDArray[np.bool_], thickness: int) -> NDArray[np.bool_]:
    """The pixels of ``mask`` within ``thickness`` of its border."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _dashed_box(height: int, width: int, thickness: int) -> NDArray[np.bool_]:
    """A dashed border around the centre square (empty when the image is square)."""
    box = np.zeros((height, width), dtype=bool)
    if width == height:
        return box
    left, top, right, bottom = center_crop_box(width, height)
    square = np.zeros_like(box)
    square[top:bottom, left:right] = True
    dash = max(4, 4 * thickness)
    rows, columns = np.indices((height, width))
    dashed: NDArray[np.bool_] = _outline(square, thickness) & (((rows + columns) // dash) % 2 == 0)
    return dashed


def _draw_legend(rgb: NDArray[np.uint8], *, lungs: bool, seen_box: bool) -> None:
    """Draw the colour bar (and what the lines mean) into the bottom-left corner."""
    height, width = rgb.shape[:2]
    bar_width, bar_height = max(24, width // 3), max(4, height // 60)
    margin = max(2, height // 100)
    labels = ["heat: low -> high"]
    labels += ["green: lungs (segmented)"] if lungs else []
    labels += ["dashed: what the model saw"] if seen_box else []
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    text_height = max(11, height // 50)
    font = ImageFont.load_default(size=text_height - 1)
    box_height = bar_height + text_height * len(labels) + 3 * margin
    top = height - box_height - margin
    draw.rectangle((margin, top, margin + bar_width + 2 * margin, height - margin), fill=(0, 0, 0))
    colours = COLOUR_MAP[np.linspace(0, 255, bar_width).astype(np.intp)]
    rgb_bar = np.repeat(colours[None], bar_height, axis=0)
    canvas.paste(Image.fromarray(rgb_bar), (2 * margin, top + margin))
    for i, text in enumerate(labels):
        draw.text(
            (2 * margin, top + 2 * margin + bar_height + i * text_height),
            text,
            fill="white",
            font=font,
        )
    rgb[...] = np.asarray(canvas)


def annotated_overlay(
    gray: NDArray[np.uint8],
    heat: NDArray[np.floating],
    lungs: NDArray[np.integer] | NDArray[np.bool_] | None = None,
    *,
    seen_box: bool = True,
) -> NDArray[np.uint8]:
    """:func:`overlay` with the lung outline (when ``lungs`` is given), a dashed border
    around the centre square the network saw (when ``seen_box`` and the image is not
    square; a map that is not the network's has no such square), and a legend in the
    bottom-left corner. Same size as the image.

    Raises:
        ValueError: the image, the map and the mask differ in shape.
    """
    rgb = overlay(gray, heat)
    height, width = gray.shape
    thickness = max(1, min(height, width) // 250)
    if lungs is not None:
        if lungs.shape != gray.shape:
            raise ValueError(
                f"annotated_overlay: image {gray.shape} and lungs {lungs.shape} differ"
            )
        rgb[_outline(np.asarray(lungs) != 0, thickness)] = LUNG_COLOUR
    border = _dashed_box(height, width, thickness) if seen_box else np.zeros_like(gray, bool)
    rgb[border] = SEEN_COLOUR
    if min(height, width) >= 64:  # no room for a legend on a thumbnail
        _draw_legend(rgb, lungs=lungs is not None, seen_box=bool(border.any()))
    return rgb


@functools.cache
def _shipped_segmenter() -> LungSegmenter | None:
    try:
        from covidcxr.models.lungs import LungSegmenter

        return LungSegmenter.load()
    except (MissingExtraError, MetadataError) as exc:
        log.info("heatmap overlays without the lung outline: %s", exc)
        return None


def lung_mask(gray: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
    """The shipped lung segmenter's mask of a whole ``(H, W)`` grey image (1 lung) to
    draw (:func:`drawable_lungs`), or None when it cannot run (no torch, or no weights)."""
    segmenter = _shipped_segmenter()
    return None if segmenter is None else drawable_lungs(segmenter.segment(gray))


def drawable_lungs(mask: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
    """``mask`` when it holds two lungs, one on each side
    (:func:`covidcxr.models.lungs.two_lungs`), else None: an overlay then draws no
    outline, rather than call an arm or half a chest "lungs"."""
    from covidcxr.models.lungs import two_lungs

    if two_lungs(mask):
        return mask
    log.info("heatmap overlay without the lung outline: the segmenter found no two lungs")
    return None


def line_layer(
    height: int,
    width: int,
    lungs: NDArray[np.integer] | NDArray[np.bool_] | None = None,
    *,
    seen_box: bool = True,
) -> NDArray[np.uint8]:
    """The lines of :func:`annotated_overlay` alone, as an ``(H, W, 4)`` RGBA layer to
    lay over the image in a viewer: the lung outline (when ``lungs`` is given) and the
    dashed border of the centre square the network saw (when ``seen_box`` and the image
    is not square); transparent elsewhere.

    Raises:
        ValueError: ``lungs`` is not ``(height, width)``.
    """
    if lungs is not None and lungs.shape != (height, width):
        raise ValueError(f"line_layer: lungs {lungs.shape} is not {(height, width)}")
    layer = np.zeros((height, width, 4), dtype=np.uint8)
    thickness = max(1, min(height, width) // 250)
    if lungs is not None:
        layer[_outline(np.asarray(lungs) != 0, thickness)] = (*LUNG_COLOUR, 255)
    if seen_box:
        layer[_dashed_box(height, width, thickness)] = (*SEEN_COLOUR, 255)
    return layer


def write_overlay(
    path: str | os.PathLike[str],
    gray: NDArray[np.uint8],
    heat: NDArray[np.floating],
    lungs: NDArray[np.integer] | NDArray[np.bool_] | Literal["auto"] | None = "auto",
    *,
    seen_box: bool = True,
) -> None:
    """Write :func:`annotated_overlay` as an RGB PNG (atomically: never half a file).

    Args:
        path: the PNG to write.
        gray: ``(H, W)`` uint8 image.
        heat: ``(H, W)`` map in [0, 1].
        lungs: a lung mask; ``"auto"`` segments ``gray`` with the shipped lung model
            when torch and its weights are there (no outline otherwise); None: none.
        seen_box: draw the border of the square the network saw (see
            :func:`annotated_overlay`).
    """
    if isinstance(lungs, str):
        lungs = lung_mask(gray)
    image = Image.fromarray(annotated_overlay(gray, heat, lungs, seen_box=seen_box))
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")


def write_raw_map(path: str | os.PathLike[str], raw: NDArray[np.floating]) -> None:
    """Write a raw map (the network's ``(h, w)`` resolution, before ReLU) as ``.npy``."""
    with atomic_output(path) as temporary, temporary.open("wb") as handle:
        np.save(handle, np.asarray(raw, dtype=np.float32))


def grad_cam(model: CXRModel, images: torch.Tensor, targets: Sequence[int]) -> NDArray[np.float32]:
    """Grad-CAM of findings with captum's ``LayerGradCam`` on the backbone's output.

    Args:
        model: the network (in eval mode, so dropout is off).
        images: ``(B, 1, H, W)`` input in [-1024, 1024].
        targets: for each image, the finding index to explain.

    Returns:
        ``(B, h, w)`` float32 maps at the feature map's resolution, before ReLU.

    Raises:
        MissingExtraError: captum or torch is not installed.
    """
    try:
        import torch
        from captum.attr import LayerGradCam
    except ImportError as exc:
        raise MissingExtraError(getattr(exc, "name", None) or "captum", "ml") from exc

    if len(targets) != images.shape[0]:
        raise ValueError(f"grad_cam: {images.shape[0]} images but {len(targets)} targets")

    def findings_logits(batch: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(batch)["findings"]
        return logits

    method = LayerGradCam(findings_logits, model.backbone)
    target = torch.as_tensor(list(targets), dtype=torch.long, device=images.device)
    with torch.enable_grad():
        attribution = method.attribute(images, target=target, relu_attributions=False)
    result: NDArray[np.float32] = attribution[:, 0].detach().cpu().numpy().astype(np.float32)
    return result
