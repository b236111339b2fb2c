"""Networks: a small chest X-ray CNN, pluggable backbones, and the shared heads.

Every model is ``backbone -> feature map (B, C, h, w) -> global average pool -> linear
heads``. Linear heads after average pooling make the class activation map
``sum_c w_kc * A_c`` equal to Grad-CAM for class ``k`` (up to a positive factor), so
the heatmap can be computed without gradients in the torch-free ONNX path and checked
against Grad-CAM (captum) in the torch path.

Inputs follow torchxrayvision: one channel, values in [-1024, 1024].

Backbones:

* ``small`` (built in, trained here): ~1.2 M parameters, ~0.2 GMAC at 224 px, about a
  fifteenth of DenseNet-121.
* ``torchscript:PATH``: any TorchScript module on disk mapping (B, 1, H, W) in
  [-1024, 1024] to a feature map (bring your own pretrained weights).
* ``xrv-densenet121:PATH``: torchxrayvision's DenseNet-121 with a state dict from disk
  (needs ``torchxrayvision``; nothing is downloaded).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from covidcxr.errors import MetadataError, MissingExtraError

INPUT_SCALE = 1024.0


def _conv_bn(in_channels: int, out_channels: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Stage(nn.Module):
    """Downsample by 2, then a residual 3x3 block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = _conv_bn(in_channels, out_channels, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return F.relu(x + self.conv(x))


class SmallBackbone(nn.Module):
    """A compact residual CNN for 1-channel radiographs.

    Args:
        width: channels of the first stage; the last stage has ``8 * width``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width // 2, stride=2, kernel=5)
        self.stages = nn.Sequential(
            _Stage(width // 2, width),
            _Stage(width, 2 * width),
            _Stage(2 * width, 4 * width),
            _Stage(4 * width, 8 * width),
        )
        self.out_channels = 8 * width

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) in [-1024, 1024] -> (B, C, H/32, W/32)."""
        features: Tensor = self.stages(self.stem(x / INPUT_SCALE))
        return features


class Heads(nn.Module):
    """Linear heads on the pooled features.

    Outputs:
        findings: logits, one per finding label.
        severity: (mean, log-variance) per severity target, interleaved as
            ``[mean_0, mean_1, logvar_0, logvar_1]``.
        gate: logits over the input-gate classes.
    """

    def __init__(
        self, channels: int, n_findings: int, n_severity: int, n_gate: int, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.findings = nn.Linear(channels, n_findings)
        self.severity = nn.Linear(channels, 2 * n_severity)
        self.gate = nn.Linear(channels, n_gate)

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        pooled = self.dropout(pooled)
        return {
            "findings": self.findings(pooled),
            "severity": self.severity(pooled),
            "gate": self.gate(pooled),
        }


@dataclass(frozen=True)
class Outputs:
    """What a forward pass gives (feature map kept for heatmaps)."""

    features: Tensor
    pooled: Tensor
    findings: Tensor
    severity: Tensor
    gate: Tensor


class CXRModel(nn.Module):
    """Backbone + heads. ``forward`` returns a dict so it traces/exports cleanly."""

    def __init__(
        self, backbone: nn.Module, channels: int, n_findings: int, n_severity: int, n_gate: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = Heads(channels, n_findings, n_severity, n_gate)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, 1, H, W) -> features, pooled, findings, severity, gate."""
        features = self.backbone(x)
        pooled = features.mean(dim=(2, 3))
        return {"features": features, "pooled": pooled, **self.heads(pooled)}

    def outputs(self, x: Tensor) -> Outputs:
        """Typed view of :meth:`forward`."""
        result = self(x)
        return Outputs(
            result["features"],
            result["pooled"],
            result["findings"],
            result["severity"],
            result["gate"],
        )


class _TorchScriptBackbone(nn.Module):
    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)  # type: ignore[no-any-return]


class _XrvDenseNetBackbone(nn.Module):
    def __init__(self, weights: Path) -> None:
        super().__init__()
        try:
            import torchxrayvision as xrv
        except ImportError as exc:
            raise MissingExtraError("torchxrayvision", "bench") from exc
        model = xrv.models.DenseNet(weights=None)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.features = model.features

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.features(x))


def build_backbone(spec: str = "small", *, width: int = 32) -> tuple[nn.Module, int]:
    """Build a backbone from a spec; returns it and its output channels.

    Args:
        spec: ``small``, ``torchscript:PATH`` or ``xrv-densenet121:PATH``.
        width: width of the built-in ``small`` backbone.

    Raises:
        MetadataError: unknown spec, or a file that is missing or not a backbone.
    """
    kind, _, location = spec.partition(":")
    if kind == "small":
        backbone = SmallBackbone(width)
        return backbone, backbone.out_channels
    path = Path(location).expanduser()
    if kind not in ("torchscript", "xrv-densenet121"):
        raise MetadataError(
            f"build_backbone: unknown backbone {spec!r}; use small, torchscript:PATH or "
            "xrv-densenet121:PATH"
        )
    if not path.is_file():
        raise MetadataError(f"build_backbone: {spec!r}: no file {path}")
    external: nn.Module
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                # torch deprecates TorchScript in favour of torch.export; a user's
                # TorchScript backbone is still a valid input, so the warning is not
                # theirs to act on here.
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            external = _TorchScriptBackbone(loaded)
        except RuntimeError as exc:
            raise MetadataError(
                f"build_backbone: {path} is not a TorchScript module: {exc}"
            ) from exc
    else:
        external = _XrvDenseNetBackbone(path)
    with torch.no_grad():
        probe = external.eval()(torch.zeros(1, 1, 224, 224))
    if probe.ndim != 4:
        raise MetadataError(
            f"build_backbone: {spec!r} returns shape {tuple(probe.shape)}; a backbone must "
            "return a feature map (B, C, h, w)"
        )
    return external, int(probe.shape[1])
