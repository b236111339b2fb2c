"""ONNX export: onnxruntime gives what torch gives, for any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidcxr.errors import MetadataError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from covidcxr.models.network import CXRModel, build_backbone
from covidcxr.models.onnx_export import INPUT_NAME, OUTPUT_NAMES, export_onnx


def _model(spec: str = "small") -> CXRModel:
    generator = torch.Generator().manual_seed(0)
    backbone, channels = build_backbone(spec, width=8)
    model = CXRModel(backbone, channels, 5, 2, 5)
    with torch.no_grad():
        for parameter in model.parameters():  # non-trivial weights, BN statistics too
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.train()  # export must switch to eval itself


def _compare(model: CXRModel, path: Path, size: int) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    model.eval()
    for batch in (1, 3):
        images = np.random.default_rng(batch).uniform(-1024, 1024, (batch, 1, size, size))
        images = images.astype(np.float32)
        got = session.run(None, {INPUT_NAME: images})
        with torch.no_grad():
            expected = model(torch.from_numpy(images))
        for name, value in zip(OUTPUT_NAMES, got, strict=True):
            reference = expected[name].numpy()
            assert value.shape == reference.shape, name
            np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_onnx_matches_torch_with_a_dynamic_batch(tmp_path: Path) -> None:
    model = _model()
    path = export_onnx(model, tmp_path / "model.onnx", 64)
    assert model.training  # the caller's mode is restored
    assert path.stat().st_size < 1_000_000  # width 8: ~45k parameters
    _compare(model, path, 64)


# The trace path goes through torch.jit, which torch deprecates in favour of
# torch.export; a TorchScript backbone cannot take that path (2026-11).
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_torchscript_backbone_exports_through_a_trace(tmp_path: Path) -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x / 1024.0))

    file = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(file))
    model = _model(f"torchscript:{file}")
    path = export_onnx(model, tmp_path / "model.onnx", 32)
    _compare(model, path, 32)


def test_the_small_backbone_exports_through_a_trace_too(tmp_path: Path) -> None:
    model = _model()
    path = export_onnx(model, tmp_path / "traced.onnx", 32, exporter="torchscript")
    _compare(model, path, 32)


def test_unknown_exporter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="unknown exporter 'tf'"):
        export_onnx(_model(), tmp_path / "x.onnx", 32, exporter="tf")  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()
