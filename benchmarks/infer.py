"""Inference latency: a full second opinion vs torchxrayvision's DenseNet-121 forward pass.

In one process, with torch at 2 intra-op threads (and onnxruntime at 2), interleaving
the measurements so that load from other processes hits every case alike:

* **baseline**: ``xrv.models.DenseNet(weights=None)`` (random weights, nothing
  downloaded), forward pass only, on a ``(B, 1, 224, 224)`` tensor in [-1024, 1024];
* **ours, from an already-decoded 224 px array** (the same pixels the baseline's tensor
  is made from): a full second opinion per image = pixel rules of the input gate
  (size, colour) + preprocessing (crop/resize, normalisation) + forward pass + gate-head
  decision + calibrated findings + severity with intervals + a CAM heatmap of the top
  finding upsampled to the image; torch engine, ONNX engine (onnxruntime), and torch
  with captum's Grad-CAM instead of CAM;
* **ours, from a file**: the same plus reading, safe decoding (format sniffing, pixel
  limit, truncation checks) and hashing of a real radiograph file.

Batch 1 and 16; the table gives the median milliseconds per image and the ratio to the
DenseNet forward pass at the same batch size (goal: < 0.5).

The model is the shipped bundle when there is one (``--model`` picks another), else a
randomly initialised bundle of the same architecture (``small`` backbone, width 32),
written to a temporary folder. Either way the gate head is evaluated, but its frontal
threshold is set to 0 for the timing, so that every image gets the whole pipeline
(an untrained gate head would otherwise refuse the images and skip the findings).

Usage::

    python benchmarks/infer.py [--model ID|PATH] [--image FILE] [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from covidcxr.dataset.loading import load_image, normalise  # noqa: E402
from covidcxr.errors import MetadataError  # noqa: E402
from covidcxr.models.bundle import ModelBundle, load_bundle  # noqa: E402

THREADS = 2
SIZE = 224
BATCHES = (1, 16)
SHARED_IMAGES = ROOT.parent / "shared" / "datasets" / "covid-chestxray" / "images"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pick_image(explicit: str | None, workdir: Path) -> tuple[Path, str]:
    """A real radiograph file (``--image``, else the shared collection's first PA
    image), or a synthetic one written to ``workdir``."""
    if explicit:
        return Path(explicit), "given"
    if SHARED_IMAGES.is_dir():
        for path in sorted(SHARED_IMAGES.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                return path, "shared collection"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1024, 0:1024] / 1024
    pixels = 128 + 70 * np.sin(5 * x) * np.cos(3 * y) + rng.normal(0, 8, (1024, 1024))
    path = workdir / "synthetic.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path, "synthetic 1024 px PNG"


def _bundle(model: str | None, workdir: Path) -> tuple[ModelBundle, str]:
    try:
        bundle = load_bundle(model)
        return bundle, f"{bundle.model_id} ({'given' if model else 'shipped'}, {bundle.path})"
    except MetadataError as exc:
        if model is not None:
            raise
        _log(f"no shipped model ({exc}); using random weights")
    from covidcxr.models.predict import random_bundle

    bundle = random_bundle(workdir / "random-small", model_id="random-small-w32", width=32)
    return bundle, "random-small-w32 (no shipped model: random weights, small backbone width 32)"


def _forward(network: Any, tensor: Any) -> Callable[[], None]:
    """The baseline: one forward pass, no gradients."""
    import torch

    def run() -> None:
        with torch.inference_mode():
            network(tensor)

    return run


def _opinion(engine: Any, arrays: list[Any], batch: int) -> Callable[[], None]:
    """A full second opinion (gate, findings, severity, heatmap) on decoded arrays."""

    def run() -> None:
        rows = engine.predict_arrays(arrays, heatmaps=True, batch_size=batch)
        assert all(row.heatmaps for row in rows), "every image gets a heatmap"

    return run


def _from_file(engine: Any, files: list[Path], batch: int) -> Callable[[], None]:
    """The same from files: reading, safe decoding and hashing included."""

    def run() -> None:
        rows = engine.predict_files(files, heatmaps=True, batch_size=batch)
        assert all(row.heatmaps for row in rows), "every image gets a heatmap"

    return run


def _median_ms_per_image(samples: list[float], batch: int) -> float:
    return 1000.0 * statistics.median(samples) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle id or folder (default: the shipped model)")
    parser.add_argument("--image", help="a radiograph file for the from-file rows")
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default 15)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 repeats")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 15)
    warmup = 1 if args.quick else 3

    import onnxruntime
    import torch
    import torchxrayvision as xrv

    from covidcxr.models.predict import Predictor
    from covidcxr.models.runtime import OnnxPredictor

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="covidcxr-infer-") as tmp:
        workdir = Path(tmp)
        bundle, described = _bundle(args.model, workdir)
        # Evaluate the gate head, but let every image through (see the docstring).
        timed_bundle = dataclasses.replace(
            bundle, gate=dataclasses.replace(bundle.gate, min_frontal_probability=0.0)
        )
        image_path, image_source = _pick_image(args.image, workdir)
        pixels = load_image(image_path, SIZE)  # the decoded 224 px array both sides use

        densenet = xrv.models.DenseNet(weights=None).eval()
        ours_torch = Predictor(timed_bundle, saliency_method="cam")
        ours_gradcam = Predictor(timed_bundle, saliency_method="gradcam")
        ours_onnx = OnnxPredictor(timed_bundle, threads=THREADS)
        n_params = sum(p.numel() for p in ours_torch.model.parameters())
        n_params_densenet = sum(p.numel() for p in densenet.parameters())

        results: dict[tuple[str, int], float] = {}
        for batch in BATCHES:
            tensor = torch.from_numpy(normalise(pixels))[None, None].repeat(batch, 1, 1, 1)
            arrays = [pixels] * batch
            files = [image_path] * batch

            cases: dict[str, Callable[[], None]] = {
                "torchxrayvision DenseNet-121, forward only": _forward(densenet, tensor),
                "ours, torch, CAM": _opinion(ours_torch, arrays, batch),
                "ours, onnxruntime, CAM": _opinion(ours_onnx, arrays, batch),
                "ours, torch, Grad-CAM (captum)": _opinion(ours_gradcam, arrays, batch),
                "ours, torch, CAM, from file": _from_file(ours_torch, files, batch),
                "ours, onnxruntime, CAM, from file": _from_file(ours_onnx, files, batch),
            }
            _log(f"batch {batch}: warm-up")
            for _ in range(warmup):
                for case in cases.values():
                    case()
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for r in range(repeats):
                _log(f"batch {batch}: repeat {r + 1}/{repeats}")
                for name, case in cases.items():  # interleaved: load hits all alike
                    start = time.perf_counter()
                    case()
                    samples[name].append(time.perf_counter() - start)
            for name, values in samples.items():
                results[(name, batch)] = _median_ms_per_image(values, batch)

    print(
        f"covidcxr inference benchmark: {SIZE} px, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
        f"({THREADS} intra-op threads), torchxrayvision {xrv.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible"
    )
    print(f"model: {described}; {n_params / 1e6:.2f} M parameters")
    print(f"baseline: DenseNet-121, random weights, {n_params_densenet / 1e6:.2f} M parameters")
    print(f"file rows: {image_path} ({image_source})")
    print(f"median of {repeats} repeats after {warmup} warm-up; ms per image\n")
    names = list(dict.fromkeys(name for name, _ in results))
    width = max(len(n) for n in names)
    header = f"{'case'.ljust(width)}  " + "  ".join(
        f"{'batch ' + str(b):>9}  {'ratio':>6}" for b in BATCHES
    )
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for batch in BATCHES:
            ms = results[(name, batch)]
            ratio = ms / results[(names[0], batch)]
            cells.append(f"{ms:9.2f}  {ratio:6.3f}")
        print(f"{name.ljust(width)}  " + "  ".join(cells))
    goal = all(results[("ours, torch, CAM", b)] < 0.5 * results[(names[0], b)] for b in BATCHES)
    goal_onnx = all(
        results[("ours, onnxruntime, CAM", b)] < 0.5 * results[(names[0], b)] for b in BATCHES
    )
    print(
        "\nratio = ms/image over DenseNet-121's forward ms/image at the same batch; goal < 0.5 "
        f"(full second opinion from a decoded array): torch {'met' if goal else 'NOT met'}, "
        f"onnxruntime {'met' if goal_onnx else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
