"""Does the loader keep the accelerator busy? Training steps vs the loader, one invocation.

Builds a synthetic collection of distinct chest-X-ray-sized images (1024 x 1024 px;
half baseline JPEGs, half 8-bit PNGs, smooth with noise like films) written as blobs,
then measures at 224 px:

1. **model alone**: training steps (forward, backward, AdamW; bf16 autocast on CUDA)
   on a batch already on the device: the images per second the model can take;
2. **loader alone**: :class:`~covidcxr.dataset.CollectionDataset` through a
   ``DataLoader`` (``pin_memory`` on CUDA) with each number of workers: a first pass
   on an empty preprocessing cache, then a cached pass;
3. **training fed by the loader**: one cached epoch of the same training steps with
   batches from the loader: images per second, and the share of the epoch spent
   waiting for the next batch.

Each loader runs with float32 images (torchxrayvision's range, the default) and with
``normalise=False`` (``uint8`` images, a quarter of the bytes to pass between
processes, made float32 by :func:`~covidcxr.dataset.torch_dataset.normalise_batch` on
the device).

Models: covidcxr's ``small`` network at the shipped model's width (24) and
torchvision's DenseNet-121 with one input channel (torchxrayvision's backbone; on a
GPU only).
Ratios are loader images/s over the model's.

Usage::

    python benchmarks/train_feed.py [--images 2000] [--batch 64] [--workers 0,4,8]
                                    [--device cuda|cpu] [--quick]

Writes only to a temporary directory.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from covidcxr.dataset.samples import Sample, SampleSet, Selection  # noqa: E402
from covidcxr.dataset.tasks import get_task  # noqa: E402
from covidcxr.dataset.torch_dataset import CollectionDataset, normalise_batch  # noqa: E402
from covidcxr.models.network import CXRModel, build_backbone  # noqa: E402
from covidcxr.store.blobs import sha256_hex  # noqa: E402

SIDE = 1024
SIZE = 224
TASK = get_task("findings")


def _film(index: int) -> bytes:
    """One distinct film-like image, JPEG (even index) or PNG (odd)."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    picture = np.zeros((SIDE, SIDE), np.float32)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0.2, 0.8, 3)
        picture += rng.uniform(-1, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / radius**2)
    picture = (picture - picture.min()) / (float(np.ptp(picture)) or 1.0) * 200 + 20
    picture += rng.normal(0, 3, picture.shape).astype(np.float32)
    pixels = np.clip(picture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    if index % 2 == 0:
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def _collection(folder: Path, images: int) -> SampleSet:
    blobs = folder / "blobs"
    samples = []
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for index, data in enumerate(pool.map(_film, range(images), chunksize=8)):
            sha = sha256_hex(data)
            (blobs / sha[:2]).mkdir(parents=True, exist_ok=True)
            (blobs / sha[:2] / sha).write_bytes(data)
            labels = tuple(float(i == index % len(TASK.labels)) for i in range(len(TASK.labels)))
            samples.append(Sample(index, sha, f"synthetic:{index}", "synthetic", labels))
    return SampleSet(TASK, Selection(), samples, Counter(), blobs)


class _DenseNet(nn.Module):
    """torchvision's DenseNet-121 on one channel, pooled features to the findings."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        from torchvision.models import densenet121

        network = densenet121(weights=None, num_classes=outputs)
        network.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.network = network

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"findings": self.network(x)}


def _models(cuda: bool) -> dict[str, nn.Module]:
    """Fresh networks to train; DenseNet-121 on a GPU only (hours on a CPU)."""
    outputs = len(TASK.labels)
    backbone, channels = build_backbone("small", width=24)
    models: dict[str, nn.Module] = {
        "covidcxr small (width 24)": CXRModel(backbone, channels, outputs, 2, 3)
    }
    if cuda:
        models["DenseNet-121 (1 channel)"] = _DenseNet(outputs)
    return models


class _Trainer:
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device).train()
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.autocast = device.type == "cuda"

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # a normalise=False loader's batch
            images = normalise_batch(images)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(images)["findings"]
        known = ~torch.isnan(labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float()[known], labels[known])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())  # one synchronisation per step, as a logging loop has


def _model_rate(trainer: _Trainer, batch: int, steps: int) -> float:
    images = torch.randn(batch, 1, SIZE, SIZE, device=trainer.device) * 500
    labels = torch.randint(0, 2, (batch, len(TASK.labels)), device=trainer.device).float()
    for _ in range(5):
        trainer.step(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(images, labels)
    return batch * steps / (time.perf_counter() - start)


def _loader(dataset: CollectionDataset, batch: int, workers: int, cuda: bool) -> Any:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(0),
    )


def _pass(loader: Any) -> float:
    start, count = time.perf_counter(), 0
    for item in loader:
        count += len(item["idx"])
    return count / (time.perf_counter() - start)


def _fed_epoch(loader: Any, trainer: _Trainer) -> tuple[float, float]:
    """Images/s and the share of the epoch spent waiting for batches."""
    start, waited, count = time.perf_counter(), 0.0, 0
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        item = next(batches, None)
        waited += time.perf_counter() - asked
        if item is None:
            break
        trainer.step(item["img"], item["lab"])
        count += len(item["idx"])
    total = time.perf_counter() - start
    return count / total, waited / total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, help="distinct images (default 2000, --quick 64)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", help="comma-separated DataLoader workers (default 0,2,...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="timed steps of the model alone")
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    args = parser.parse_args(argv)
    images = args.images or (64 if args.quick else 2000)
    steps = args.steps or (3 if args.quick else 30)
    cpus = os.cpu_count() or 1
    workers = (
        [int(w) for w in args.workers.split(",")]
        if args.workers
        else sorted({0, *(w for w in (2, 4, 8, 16) if w <= cpus)})
    )
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"train_feed: {name}, {cpus} CPUs, torch {torch.__version__}, {images} images "
        f"({SIDE} px, half JPEG, half PNG), {SIZE} px, batch {args.batch}"
    )
    with tempfile.TemporaryDirectory(prefix="covidcxr-feed-") as temporary:
        folder = Path(temporary)
        start = time.perf_counter()
        samples = _collection(folder, images)
        print(f"collection written in {time.perf_counter() - start:.1f} s")

        model_rates = {}
        for label, model in _models(cuda).items():
            model_rates[label] = _model_rate(_Trainer(model, device), args.batch, steps)
        header = f"{'model alone':<28} {'images/s':>9}"
        print(f"\n{header}\n{'-' * len(header)}")
        for label, rate in model_rates.items():
            print(f"{label:<28} {rate:>9.0f}")

        def dataset(normalised: bool, count: int) -> CollectionDataset:
            cache = folder / f"cache-{count}-{'float32' if normalised else 'uint8'}"
            return CollectionDataset(
                samples, size=SIZE, cache_dir=cache, masks=False, normalise=normalised
            )

        ratio_names = " ".join(f"{'cached / ' + m.split(' ')[0]:>16}" for m in model_rates)
        header = f"{'loader img':<10} {'workers':>7} {'first pass/s':>12} {'cached/s':>9} "
        print(f"\n{header}{ratio_names}\n{'-' * len(header + ratio_names)}")
        best: dict[bool, tuple[float, int]] = {}
        for normalised in (True, False):
            for count in workers:
                loader = _loader(dataset(normalised, count), args.batch, count, cuda)
                first = _pass(loader)
                cached = _pass(loader)
                best[normalised] = max(best.get(normalised, (0.0, 0)), (cached, count))
                ratios = " ".join(f"{cached / rate:>15.2f}x" for rate in model_rates.values())
                kind = "float32" if normalised else "uint8"
                print(f"{kind:<10} {count:>7} {first:>12.0f} {cached:>9.0f} {ratios}")
                del loader

        header = (
            f"{'training fed by the loader':<28} {'loader img':<10} {'workers':>7} "
            f"{'images/s':>9} {'waiting':>8}"
        )
        print(f"\n{header}\n{'-' * len(header)}")
        for label, model in _models(cuda).items():
            for normalised in (True, False):
                count = best[normalised][1]
                loader = _loader(dataset(normalised, count), args.batch, count, cuda)
                trainer = _Trainer(model, device)
                _fed_epoch(loader, trainer)  # warm-up epoch (and the workers' start)
                rate, waiting = _fed_epoch(loader, trainer)
                kind = "float32" if normalised else "uint8"
                print(f"{label:<28} {kind:<10} {count:>7} {rate:>9.0f} {waiting:>7.0%}")
                del loader
        print(
            "\nmodel alone: training steps on a batch already on the device; loader: "
            "DataLoader passes (first on an empty cache); fed: a cached epoch of the same "
            "steps with the loader's batches (waiting: share of it spent in next(loader)), "
            "from the loader with the most cached images/s; uint8: normalise=False, "
            "normalise_batch on the device"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
