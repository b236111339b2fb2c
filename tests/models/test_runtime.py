"""The torch-free CPU path: onnxruntime gives the torch path's rows, and needs no torch.

The bundle is built here as training builds one: a randomly initialised network, its
state dict, :func:`covidcxr.models.onnx_export.export_onnx` (dynamic batch), then
:func:`write_bundle`. The gate
head's frontal bias is set so that about half of the synthetic images pass it, so the
two engines' verdicts are compared on both outcomes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from numpy.typing import NDArray
from PIL import Image

from covidcxr.cli import main
from covidcxr.dataset.loading import load_image, normalise
from covidcxr.errors import MetadataError
from covidcxr.models.bundle import GATE_CLASSES, ModelBundle, load_bundle, write_bundle
from covidcxr.models.network import CXRModel, build_backbone
from covidcxr.models.onnx_export import export_onnx
from covidcxr.models.predict import Predictor
from covidcxr.models.runtime import FINDINGS_WEIGHT, OnnxPredictor, read_onnx_initializer

SRC = Path(__file__).resolve().parents[2] / "src"
FINDINGS = ("COVID-19", "Other viral pneumonia", "Bacterial pneumonia", "No finding")
SEVERITY = ("geographic_extent", "opacity")
N_IMAGES = 8


def xray(height: int, width: int, seed: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = 128 + 70 * np.sin((4 + seed) * x) * np.cos((3 + seed % 3) * y)
    base += rng.normal(0, 10, (height, width))
    pixels: NDArray[np.uint8] = np.clip(base, 0, 255).astype(np.uint8)
    return pixels


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic radiographs (PNG and JPEG), a tiny one, a colour photo, a text file."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        pixels = xray(240 + 17 * i, 300 - 9 * i, i)
        if i % 2:
            Image.fromarray(pixels).save(folder / f"x{i}.jpg", quality=92)
        else:
            Image.fromarray(pixels).save(folder / f"x{i}.png")
    Image.fromarray(xray(64, 80, 99)).save(folder / "tiny.png")
    colour = np.zeros((200, 200, 3), dtype=np.uint8)
    colour[:100] = (200, 30, 30)
    colour[100:] = (30, 200, 30)
    Image.fromarray(colour).save(folder / "photo.png")
    (folder / "readme.txt").write_text("hello\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, images: Path) -> ModelBundle:
    folder = tmp_path_factory.mktemp("models") / "onnx-test"
    folder.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        backbone, channels = build_backbone("small", width=8)
        model = CXRModel(backbone, channels, len(FINDINGS), len(SEVERITY), len(GATE_CLASSES))
    model.eval()
    # Shift the frontal logit so that half of the radiographs pass the gate head: the
    # margin an image needs is logsumexp(other logits) - frontal logit.
    batch = np.stack([normalise(load_image(p, 224)) for p in sorted(images.glob("x*"))])[:, None]
    with torch.no_grad():
        logits = model(torch.from_numpy(batch))["gate"].double()
        margins = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
        ordered = margins.sort().values
        half = len(ordered) // 2
        model.heads.gate.bias[0] += float(ordered[half - 1] + ordered[half]) / 2
    torch.save(model.state_dict(), folder / "weights.pt")
    export_onnx(model, folder / "model.onnx", 224)  # the shipped models' exporter
    written = write_bundle(
        ModelBundle(
            path=folder,
            model_id="onnx-test",
            backbone={"spec": "small", "width": 8},
            input_size=224,
            findings=FINDINGS,
            finding_definitions={},
            temperatures=(1.5, 1.0, 0.8, 1.2),
            thresholds=(0.5, 0.4, 0.6, 0.5),
            operating_point="test",
            severity=SEVERITY,
            severity_ranges=((0.0, 8.0), (0.0, 6.0)),
            severity_interval={"level": 0.9},  # Gaussian from the predicted variance
        ),
        "# onnx-test\n\nRandom weights.\n",
    )
    assert set(written.files) == {"weights.pt", "model.onnx", "MODEL_CARD.md"}
    return load_bundle(folder)


def test_onnx_and_torch_give_the_same_rows(bundle: ModelBundle, images: Path) -> None:
    by_torch = Predictor(bundle, saliency_method="cam").predict_files([images], batch_size=4)
    by_onnx = OnnxPredictor(bundle, threads=1).predict_files([images], batch_size=3)
    assert len(by_torch) == len(by_onnx) == N_IMAGES + 3
    verdicts = [row.input_check for row in by_torch]
    assert verdicts == [row.input_check for row in by_onnx]
    assert [row.gate.code for row in by_torch] == [row.gate.code for row in by_onnx]
    radiographs = [row for row in by_torch if Path(row.file).name.startswith("x")]
    assert sum(row.input_check == "pass" for row in radiographs) == N_IMAGES // 2
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a.file == b.file
        assert (a.engine, b.engine) == ("torch", "onnx")
        assert a.weights_sha256 == b.weights_sha256 == bundle.weights_sha256
        if a.gate.frontal_probability is not None:
            assert b.gate.frontal_probability == pytest.approx(a.gate.frontal_probability, abs=1e-4)
        assert a.positive == b.positive
        for label in bundle.findings:
            pa, pb = a.probabilities[label], b.probabilities[label]
            assert (pa is None) == (pb is None)
            if pa is not None and pb is not None:
                assert pb == pytest.approx(pa, abs=1e-4)
        for name in bundle.severity:
            sa, sb = a.severity[name], b.severity[name]
            assert (sa is None) == (sb is None)
            if sa is not None and sb is not None:
                assert (sb.mean, sb.low, sb.high) == pytest.approx(
                    (sa.mean, sa.low, sa.high), abs=1e-3
                )


def test_onnx_heatmaps_match_torch(bundle: ModelBundle) -> None:
    arrays = [xray(256, 256, 40 + i) for i in range(4)]
    torch_rows = Predictor(bundle).predict_arrays(arrays, heatmaps=True)  # Grad-CAM
    onnx_rows = OnnxPredictor(bundle).predict_arrays(arrays, heatmaps=True, batch_size=1)
    compared = 0
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a.heatmaps.keys() == b.heatmaps.keys()
        for label in a.heatmaps:
            np.testing.assert_allclose(a.heatmaps[label], b.heatmaps[label], atol=1e-3)
            compared += 1
    assert compared > 0


def test_cam_weights_come_from_the_onnx_initializers(bundle: ModelBundle) -> None:
    weights = read_onnx_initializer(bundle.onnx_path, FINDINGS_WEIGHT, rows=len(FINDINGS))
    state = torch.load(bundle.weights_path, weights_only=True)
    np.testing.assert_array_equal(weights, state["heads.findings.weight"].numpy())
    # The exporter wraps the network: the full name works too.
    exact = read_onnx_initializer(bundle.onnx_path, "model." + FINDINGS_WEIGHT, rows=4)
    np.testing.assert_array_equal(exact, weights)
    with pytest.raises(MetadataError, match=r"has shape \(4, 64\), expected \(3, channels\)"):
        read_onnx_initializer(bundle.onnx_path, FINDINGS_WEIGHT, rows=3)
    with pytest.raises(MetadataError, match=r"no initializer 'heads\.cam'"):
        read_onnx_initializer(bundle.onnx_path, "heads.cam", rows=4)


def test_a_bundle_without_onnx_is_refused(bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"has no model\.onnx"):
        OnnxPredictor(dataclasses.replace(bundle, path=tmp_path))


def test_cli_onnx_engine(
    bundle: ModelBundle, images: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        [
            "predict",
            str(images),
            "--model",
            str(bundle.path),
            "--engine",
            "onnx",
            "--format",
            "json",
            "--heatmaps",
            str(tmp_path / "maps"),
            "--raw-maps",
            "--threads",
            "1",
        ]
    )
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {row["engine"] for row in rows} == {"onnx"}
    failed = {Path(row["file"]).name: row for row in rows if row["input_check"] == "fail"}
    assert {"tiny.png", "photo.png", "readme.txt"} <= set(failed)
    passed = [row for row in rows if row["input_check"] == "pass"]
    assert passed
    for row in passed:
        assert row["heatmaps"]
        assert all(Path(f).is_file() for f in row["heatmaps"])
        assert any(f.endswith(".npy") for f in row["heatmaps"])


BLOCK_TORCH = """
import importlib.abc
import sys


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "captum", "torchxrayvision"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockTorch())
"""


def test_runtime_and_cli_work_without_torch(
    bundle: ModelBundle, images: Path, tmp_path: Path
) -> None:
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import io
        import json
        from contextlib import redirect_stderr, redirect_stdout

        from covidcxr.cli import main
        from covidcxr.models.bundle import load_bundle
        from covidcxr.models.runtime import OnnxPredictor

        rows = OnnxPredictor(load_bundle({str(bundle.path)!r})).predict_files(
            [{str(images)!r}], heatmaps_dir={str(tmp_path / "maps")!r}
        )
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["predict", {str(images)!r}, "--model", {str(bundle.path)!r},
                         "--format", "json"])
        err = io.StringIO()
        with redirect_stderr(err):
            torch_code = main(["predict", {str(images)!r}, "--model", {str(bundle.path)!r},
                               "--engine", "torch"])
        print(json.dumps({{
            "rows": len(rows),
            "passed": sum(r.input_check == "pass" for r in rows),
            "heatmaps": sum(len(r.heatmap_files) for r in rows),
            "cli_code": code,
            "cli_engines": sorted({{r["engine"] for r in json.loads(out.getvalue())}}),
            "torch_code": torch_code,
            "torch_error": err.getvalue(),
            "torch_loaded": any(m.split(".")[0] == "torch" for m in sys.modules),
        }}))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == N_IMAGES + 3
    assert report["passed"] == N_IMAGES // 2
    assert report["heatmaps"] >= N_IMAGES // 2
    assert report["cli_code"] == 0
    assert report["cli_engines"] == ["onnx"]
    assert report["torch_code"] == 2
    assert "pip install 'covidcxr[ml]'" in report["torch_error"]
    assert report["torch_loaded"] is False
