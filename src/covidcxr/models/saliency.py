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
outside the square, which the network never saw). Overlays are written as PNG with a
colour map built here, so no plotting library is needed.

Only :func:`grad_cam` needs torch (and captum); it imports them when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.atomic import atomic_output
from covidcxr.dataset.loading import center_crop_box
from covidcxr.errors import MissingExtraError

if TYPE_CHECKING:
    import torch

    from covidcxr.models.network import CXRModel

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


def write_overlay(
    path: str | os.PathLike[str], gray: NDArray[np.uint8], heat: NDArray[np.floating]
) -> None:
    """Write :func:`overlay` as an RGB PNG (atomically: never half a file)."""
    image = Image.fromarray(overlay(gray, heat))
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
