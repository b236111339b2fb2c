"""Prediction with torch: the bundle's ``weights.pt`` in a :class:`CXRModel`.

:class:`Predictor` is the torch engine of :mod:`covidcxr.models.runtime`, which holds
everything else (inputs, gate, preprocessing, outputs, heatmap files), so the torch and
ONNX engines give the same rows. Heatmaps default to Grad-CAM computed by captum
(``LayerGradCam`` on the backbone's output); ``saliency_method="cam"`` gives the
gradient-free CAM, the same map after scaling (see :mod:`covidcxr.models.saliency`).

:func:`random_bundle` writes a bundle with random weights (and its ONNX export) for
tests, benchmarks and demos; it is not a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Final, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from covidcxr.errors import MetadataError
from covidcxr.models import saliency
from covidcxr.models.bundle import (
    GATE_CLASSES,
    ONNX_FILE,
    WEIGHTS_FILE,
    ModelBundle,
    write_bundle,
)
from covidcxr.models.network import CXRModel, build_backbone
from covidcxr.models.onnx_export import export_onnx
from covidcxr.models.rows import NetworkOutputs
from covidcxr.models.runtime import InferenceEngine

SaliencyMethod = Literal["gradcam", "cam"]
SALIENCY_METHODS: Final[tuple[str, ...]] = ("gradcam", "cam")

_DEFAULT_WIDTH: Final = 32


def _backbone_spec(bundle: ModelBundle) -> str:
    """The backbone spec, with a relative file resolved inside the bundle folder."""
    spec = str(bundle.backbone.get("spec", "small"))
    kind, sep, location = spec.partition(":")
    if sep and location and not Path(location).expanduser().is_absolute():
        inside = bundle.path / location
        if inside.is_file():
            return f"{kind}:{inside}"
    return spec


def load_model(bundle: ModelBundle, device: str | torch.device = "cpu") -> CXRModel:
    """Build the bundle's network and load ``weights.pt`` into it (eval mode).

    Raises:
        MetadataError: no weights file, or weights that do not fit the network
            model.json describes.
    """
    path = bundle.weights_path
    if not path.is_file():
        raise MetadataError(
            f"predict: model {bundle.model_id} has no {WEIGHTS_FILE} in {bundle.path}; "
            "use the onnx engine"
        )
    width = int(bundle.backbone.get("width", _DEFAULT_WIDTH))
    backbone, channels = build_backbone(_backbone_spec(bundle), width=width)
    model = CXRModel(
        backbone,
        channels,
        n_findings=len(bundle.findings),
        n_severity=len(bundle.severity),
        n_gate=len(bundle.gate_classes),
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise MetadataError(
            f"predict: model {bundle.model_id}: {path} does not fit the network "
            f"model.json describes ({str(exc).splitlines()[0]})"
        ) from exc
    return model.to(device).eval()


class Predictor(InferenceEngine):
    """Prediction with torch (and Grad-CAM heatmaps by captum).

    Args:
        bundle: the model.
        device: torch device (``cpu``, ``cuda``, ...).
        saliency_method: ``gradcam`` (captum) or ``cam`` (no gradients, faster).

    Raises:
        MetadataError: the bundle is inconsistent or its weights do not fit.
    """

    engine: ClassVar[str] = "torch"

    def __init__(
        self,
        bundle: ModelBundle,
        device: str | torch.device = "cpu",
        *,
        saliency_method: SaliencyMethod = "gradcam",
    ) -> None:
        super().__init__(bundle)
        if saliency_method not in SALIENCY_METHODS:
            raise ValueError(
                f"Predictor: saliency_method {saliency_method!r} is not one of "
                f"{', '.join(SALIENCY_METHODS)}"
            )
        self.device = torch.device(device)
        self.model = load_model(bundle, self.device)
        self.saliency_method: SaliencyMethod = saliency_method
        self._weights: NDArray[np.float32] = (
            self.model.heads.findings.weight.detach().cpu().numpy().astype(np.float32)
        )

    def forward(self, batch: NDArray[np.float32]) -> NetworkOutputs:
        """Run the network on a batch (no gradients)."""
        with torch.inference_mode():
            result = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
            return NetworkOutputs(
                findings=result["findings"].float().cpu().numpy(),
                severity=result["severity"].float().cpu().numpy(),
                gate=result["gate"].float().cpu().numpy(),
                features=result["features"].float().cpu().numpy(),
            )

    def findings_weights(self) -> NDArray[np.float32]:
        """The findings head's ``(K, C)`` weights."""
        return self._weights

    def explain(
        self, batch: NDArray[np.float32], outputs: NetworkOutputs, targets: Sequence[int]
    ) -> NDArray[np.float32]:
        """Grad-CAM (captum) or CAM maps, one per image for its target finding."""
        if self.saliency_method == "cam":
            return super().explain(batch, outputs, targets)
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        return saliency.grad_cam(self.model, images, targets)


def random_bundle(
    folder: str | Path,
    *,
    model_id: str = "random-small",
    width: int = _DEFAULT_WIDTH,
    input_size: int = 224,
    findings: Sequence[str] = (
        "COVID-19",
        "Other viral pneumonia",
        "Bacterial pneumonia",
        "Fungal pneumonia",
        "No finding",
    ),
    severity: Sequence[str] = ("geographic_extent", "opacity"),
    severity_ranges: Sequence[tuple[float, float]] = ((0.0, 8.0), (0.0, 6.0)),
    gate_bias: Sequence[float] | None = None,
    seed: int = 0,
    onnx: bool = True,
) -> ModelBundle:
    """Write a bundle holding a randomly initialised network: for tests and benchmarks.

    Args:
        folder: the bundle folder (created).
        model_id: the id written to model.json.
        width: the ``small`` backbone's width.
        input_size: the input side in pixels.
        findings: finding labels.
        severity: severity output names.
        severity_ranges: per severity output, (min, max).
        gate_bias: when given, the gate head ignores the image and outputs these
            logits (one per gate class): a way to make every image pass or fail.
        seed: seed of the weights (global torch random state is left as it was).
        onnx: also export ``model.onnx`` (:func:`covidcxr.models.onnx_export.export_onnx`).

    Returns:
        The written bundle (files hashed).
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, channels = build_backbone("small", width=width)
        model = CXRModel(backbone, channels, len(findings), len(severity), len(GATE_CLASSES))
    if gate_bias is not None:
        with torch.no_grad():
            model.heads.gate.weight.zero_()
            model.heads.gate.bias.copy_(torch.as_tensor(list(gate_bias), dtype=torch.float32))
    model.eval()
    torch.save(model.state_dict(), path / WEIGHTS_FILE)
    if onnx:
        export_onnx(model, path / ONNX_FILE, input_size)
    bundle = ModelBundle(
        path=path,
        model_id=model_id,
        backbone={"spec": "small", "width": width},
        input_size=input_size,
        findings=tuple(findings),
        finding_definitions={},
        temperatures=(1.0,) * len(findings),
        thresholds=(0.5,) * len(findings),
        operating_point="none: random weights",
        severity=tuple(severity),
        severity_ranges=tuple((float(a), float(b)) for a, b in severity_ranges),
        severity_interval={"level": 0.9, "half_width": [1.0] * len(severity)},
        training={"note": "random initialisation, not trained", "seed": seed},
    )
    card = f"# {model_id}\n\nRandom weights (seed {seed}) for tests and benchmarks: not a model.\n"
    return write_bundle(bundle, card)
