"""The public API: every name in covidcxr.__all__ resolves, and lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidcxr

TORCH_NAMES = {"CollectionDataset", "normalise_batch"}


@pytest.mark.parametrize("name", sorted(set(covidcxr.__all__) - TORCH_NAMES))
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(covidcxr, name) is not None
    assert name in dir(covidcxr)


@pytest.mark.parametrize("name", sorted(TORCH_NAMES))
def test_torch_names_resolve_with_the_ml_extra(name: str) -> None:
    pytest.importorskip("torch")
    assert callable(getattr(covidcxr, name))


def test_all_lists_exactly_the_lazy_names() -> None:
    assert set(covidcxr.__all__) == set(covidcxr._EXPORTS) | {"RESEARCH_USE_ONLY", "__version__"}


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = covidcxr.nothing_here  # type: ignore[attr-defined]


def test_importing_the_core_api_does_not_import_torch() -> None:
    code = (
        "import sys, covidcxr\n"
        "assert 'sqlalchemy' not in sys.modules, 'import covidcxr alone stays cheap'\n"
        "covidcxr.open_store, covidcxr.build_samples, covidcxr.ingest_source, covidcxr.load_split\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_predict_gives_one_row_per_file_with_provenance(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    image = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(image)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    rows = covidcxr.predict([image, not_an_image], engine="onnx")
    assert [Path(row.file).name for row in rows] == ["noise.png", "notes.txt"]
    assert rows[1].input_check == "fail"
    bundle = covidcxr.load_bundle()
    for row in rows:
        assert row.model_id == bundle.model_id
        assert row.note == covidcxr.RESEARCH_USE_ONLY
        assert row.engine == "onnx"
