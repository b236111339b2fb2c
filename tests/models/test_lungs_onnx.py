"""The lung segmenter on onnxruntime: the shipped ONNX export agrees with torch, its
sha256 is checked, and without torch the segmenter and its callers still run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import xray_like
from covidcxr.dataset.loading import preprocess_image
from covidcxr.errors import MetadataError, MissingExtraError
from covidcxr.models import lungs, lungs_training

pytest.importorskip("onnxruntime")


def chest_like(height: int = 300, width: int = 260) -> np.ndarray:
    """A bright body on black with two dark, lung-shaped ellipses."""
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


def letterboxed_inputs(size: int) -> np.ndarray:
    """Noise, two smooth pictures, a flat grey and a chest-like image, ``(5, S, S)``."""
    chest = np.asarray(preprocess_image(Image.fromarray(chest_like()), size, crop="pad"), np.uint8)
    noise = np.random.default_rng(3).integers(0, 256, (size, size), dtype=np.uint8)
    flat = np.full((size, size), 128, dtype=np.uint8)
    smooth = [xray_like(seed, (size, size)) for seed in (1, 2)]
    return np.stack([noise, *smooth, flat, chest])


@pytest.fixture(scope="module")
def both() -> tuple[lungs.LungSegmenter, lungs.LungSegmenter]:
    pytest.importorskip("torch")
    return lungs.LungSegmenter.load(backend="torch"), lungs.LungSegmenter.load(backend="onnx")


def test_the_shipped_onnx_export_agrees_with_torch(
    both: tuple[lungs.LungSegmenter, lungs.LungSegmenter],
) -> None:
    on_torch, on_onnx = both
    assert (on_torch.backend, on_onnx.backend) == ("torch", "onnx")
    images = letterboxed_inputs(on_torch.input_size)
    expected = on_torch.batch_probability(images)
    got = on_onnx.batch_probability(images, batch_size=2)  # batches of 2 and 1
    assert got.shape == images.shape and got.dtype == np.float32
    assert float(np.abs(got - expected).max()) < 1e-4
    assert float(((got >= 0.5) == (expected >= 0.5)).mean()) > 0.999
    assert 0.02 < float((expected[-1] >= 0.5).mean()) < 0.9  # the chest has lungs
    picture = chest_like(240, 310)  # not square: letterboxed and back
    masks = on_torch.segment(picture), on_onnx.segment(picture)
    assert masks[0].shape == picture.shape and float((masks[0] == masks[1]).mean()) > 0.999
    assert float(np.abs(on_torch.probability(picture) - on_onnx.probability(picture)).max()) < 1e-4


def test_batch_probability_refuses_images_of_another_shape_or_type(
    both: tuple[lungs.LungSegmenter, lungs.LungSegmenter],
) -> None:
    size = both[0].input_size
    for segmenter in both:
        assert segmenter.batch_probability(np.zeros((0, size, size), np.uint8)).shape == (
            0,
            size,
            size,
        )
        with pytest.raises(ValueError, match=r"expected uint8 \(N, 128, 128\)"):
            segmenter.batch_probability(np.zeros((1, size, size + 8), np.uint8))
        with pytest.raises(ValueError, match="float32"):
            segmenter.batch_probability(np.zeros((1, size, size), np.float32))


def copy_shipped(tmp_path: Path) -> Path:
    folder = tmp_path / "lungs-unet-v1"
    shutil.copytree(lungs.WEIGHTS_DIR, folder)
    return folder


def test_a_changed_or_missing_onnx_file_is_refused(tmp_path: Path) -> None:
    folder = copy_shipped(tmp_path)
    assert lungs.LungSegmenter.load(folder, backend="onnx").backend == "onnx"
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(MetadataError, match=r"model\.onnx.*sha256.*onnx_sha256"):
        lungs.LungSegmenter.load(folder, backend="onnx")
    onnx_path.unlink()
    with pytest.raises(MetadataError, match=r"model\.onnx.*is missing"):
        lungs.LungSegmenter.load(folder, backend="onnx")


def test_backends_are_picked_by_what_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="backend='tensorflow'"):
        lungs.LungSegmenter.load(backend="tensorflow")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "torch", None)
    assert lungs.LungSegmenter.load().backend == "onnx"
    with pytest.raises(MissingExtraError, match=r"covidcxr\[ml\]"):
        lungs.LungSegmenter.load(backend="torch")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"covidcxr\[runtime\].*covidcxr\[ml\]"):
        lungs.LungSegmenter.load()
    with pytest.raises(MissingExtraError, match=r"covidcxr\[runtime\]"):
        lungs.LungSegmenter.load(backend="onnx")


def test_a_segmenter_needs_exactly_one_network() -> None:
    with pytest.raises(ValueError, match="a torch model or an onnxruntime session"):
        lungs.LungSegmenter(None, 128)


def test_save_weights_writes_an_onnx_file_that_loads(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = lungs_training.save_weights(
        lungs.build_unet(4, 2),
        tmp_path / "tiny",
        {"input_size": 16, "base_channels": 4, "levels": 2},
    )
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    assert card["onnx_sha256"] == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    images = np.stack([xray_like(seed, (16, 16)) for seed in range(3)])
    on_torch = lungs.LungSegmenter.load(folder, backend="torch")
    on_onnx = lungs.LungSegmenter.load(folder, backend="onnx")
    difference = on_torch.batch_probability(images) - on_onnx.batch_probability(images)
    assert float(np.abs(difference).max()) < 1e-4


WITHOUT_TORCH = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'no module named {name!r} (blocked)')

sys.meta_path.insert(0, NoTorch())
import numpy as np
from PIL import Image
from covidcxr.models import abnormality, lung_gate, lungs

segmenter = lungs.LungSegmenter.load()
image = Image.fromarray(np.load(sys.argv[1]))
print(json.dumps({
    "backend": segmenter.backend,
    "torch": "torch" in sys.modules,
    "gate": lung_gate.features(segmenter, image).tolist(),
    "abnormality": abnormality.features(segmenter, image).tolist(),
}))
"""


def test_without_torch_the_segmenter_and_its_callers_run_on_onnxruntime(tmp_path: Path) -> None:
    picture_path = tmp_path / "chest.npy"
    np.save(picture_path, chest_like())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(picture_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["backend"] == "onnx" and result["torch"] is False
    pytest.importorskip("torch")
    from covidcxr.models import abnormality, lung_gate

    on_torch = lungs.LungSegmenter.load(backend="torch")
    image = Image.fromarray(chest_like())
    np.testing.assert_allclose(result["gate"], lung_gate.features(on_torch, image), atol=1e-4)
    np.testing.assert_allclose(
        result["abnormality"], abnormality.features(on_torch, image), atol=1e-4
    )
