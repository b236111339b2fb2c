"""Export a :class:`~covidcxr.models.network.CXRModel` to ONNX for the torch-free path.

The graph takes ``image`` (batch x 1 x size x size, float32 in [-1024, 1024]; the batch
axis is dynamic) and returns, in this order, :data:`OUTPUT_NAMES`:

* ``features`` (batch x C x h x w): the last feature map (for class activation maps);
* ``pooled`` (batch x C): its global average;
* ``findings`` (batch x labels): logits, before the bundle's temperatures;
* ``severity`` (batch x 2k): ``[mean_0 .. mean_k-1, logvar_0 .. logvar_k-1]``, before
  clipping to the bundle's ranges;
* ``gate`` (batch x gate classes): logits.

Exporters: torch's ``torch.export``-based exporter (the default since torch 2.9) for
plain modules; a TorchScript backbone (``torchscript:PATH``) cannot go through
``torch.export``, so the model is first traced with ``torch.jit.trace`` and the trace
exported with the TorchScript-based exporter. ``exporter="auto"`` picks between them
and falls back to the trace when ``torch.export`` fails.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.jit._trace import TracerWarning

from covidcxr.atomic import atomic_output
from covidcxr.errors import MetadataError
from covidcxr.models.network import CXRModel

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("features", "pooled", "findings", "severity", "gate")
OPSET = 18

Exporter = Literal["auto", "dynamo", "torchscript"]


class _TupleOutputs(nn.Module):
    """The model with its outputs as a tuple in :data:`OUTPUT_NAMES` order."""

    def __init__(self, model: CXRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        outputs = self.model(x)
        return (
            outputs["features"],
            outputs["pooled"],
            outputs["findings"],
            outputs["severity"],
            outputs["gate"],
        )


def _has_torchscript(model: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


def _export_dynamo(wrapper: nn.Module, example: Tensor, target: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        wrapper,
        (example,),
        str(target),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def _export_traced(wrapper: nn.Module, example: Tensor, target: Path) -> None:
    with warnings.catch_warnings():
        # torch deprecates the TorchScript-based exporter (and torch.jit) in favour of
        # torch.export, which cannot export a TorchScript backbone; this path is only
        # taken for those (or when torch.export fails), so its deprecation notices are
        # expected here and nowhere else.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        # A traced module's forward has no Python signature to read input names from;
        # they are given explicitly below.
        warnings.filterwarnings("ignore", "no signature found for", UserWarning)
        warnings.filterwarnings("ignore", category=TracerWarning)
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)  # type: ignore[no-untyped-call]
        torch.onnx.export(
            traced,
            (example,),
            str(target),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=OPSET,
            dynamo=False,
        )


def export_onnx(
    model: CXRModel,
    path: str | os.PathLike[str],
    size: int,
    *,
    exporter: Exporter = "auto",
) -> Path:
    """Write ``model`` as ONNX (fp32, weights inside the file) with a dynamic batch axis.

    The model is exported in eval mode (dropout off, BatchNorm running statistics) on
    the CPU; its own mode and device are restored afterwards. The file is written
    atomically.

    Args:
        model: the network.
        path: the ``.onnx`` file to write.
        size: the side of the square input in pixels.
        exporter: ``auto`` (``torch.export``, or a trace for TorchScript backbones and
            when ``torch.export`` fails), ``dynamo`` or ``torchscript`` (trace).

    Returns:
        The path written.

    Raises:
        MetadataError: an unknown exporter, or the model cannot be exported.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise MetadataError(
            f"export_onnx: unknown exporter {exporter!r}; use auto, dynamo or torchscript"
        )
    target = Path(path)
    was_training = model.training
    device = next(model.parameters()).device
    wrapper = _TupleOutputs(model).cpu().eval()
    example = torch.zeros(2, 1, size, size)
    try:
        with atomic_output(target) as temporary:
            tmp = temporary.with_suffix(".onnx")
            try:
                if exporter == "torchscript" or (exporter == "auto" and _has_torchscript(model)):
                    _export_traced(wrapper, example, tmp)
                else:
                    try:
                        _export_dynamo(wrapper, example, tmp)
                    except Exception as exc:  # torch.export raises many kinds
                        if exporter == "dynamo":
                            raise
                        log.warning(
                            "export_onnx: torch.export failed (%s); tracing instead",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        )
                        _export_traced(wrapper, example, tmp)
                tmp.replace(temporary)
            finally:
                tmp.unlink(missing_ok=True)
    except MetadataError:
        raise
    except Exception as exc:
        raise MetadataError(f"export_onnx: cannot export the model to {target}: {exc}") from exc
    finally:
        model.to(device).train(was_training)
    return target
