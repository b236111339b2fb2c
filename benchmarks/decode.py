"""Per-image decode cost of the training loader, by file kind: Pillow vs libpng for PNGs.

For every image (and lung mask) of the collection, times :func:`load_image` (or
:func:`load_mask`) at 224 px as covidcxr runs it (Pillow; JPEGs in draft mode), and
the same with PNGs decoded by libpng through ``imagecodecs`` instead of Pillow (the
grey conversion, crop and resize unchanged), in one process on one thread, and prints
the CPU milliseconds per file by kind (format, progressive, mode) with the ratio. The
outputs are compared pixel for pixel. This is the measurement behind decoding PNGs
with Pillow (``docs/decisions/0010-loader-library-code.md``); ``benchmarks/loader.py``
times whole passes.

Usage::

    python benchmarks/decode.py [--shared ../shared/datasets] [--repeats 3]

Needs ``imagecodecs`` (``pip install imagecodecs``). Reads the files in place; writes
nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from covidcxr.dataset import loading  # noqa: E402

SIZE = 224


def _kind(path: Path) -> str:
    with Image.open(path) as image:
        progressive = image.info.get("progressive") or image.info.get("progression")
        return f"{image.format}{' progressive' if progressive else ''} {image.mode}"


def _best_cpu_ms(call: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        call()
        best = min(best, time.process_time() - start)
    return best * 1000


def _libpng_load(path: Path, what: str) -> np.ndarray:
    """load_image/load_mask with an 8-bit PNG decoded by libpng, the rest as covidcxr."""
    import imagecodecs

    data = path.read_bytes()
    pixels = imagecodecs.png_decode(data) if data.startswith(b"\x89PNG") else None
    if pixels is None or pixels.dtype != np.uint8:
        return _covidcxr_load(path, what)  # not an 8-bit PNG: Pillow's path
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        pixels = pixels[..., 0]  # grey + alpha: the grey
    image = Image.fromarray(np.ascontiguousarray(pixels))  # L, RGB or RGBA
    resample = loading.RESAMPLE if what == "image" else Image.Resampling.NEAREST
    resized = loading._crop_resize(loading._gray(image), image.size, 1.0, SIZE, "center", resample)
    grey = loading._to_uint8(resized)
    return grey if what == "image" else np.ascontiguousarray(grey >= 128, dtype=np.uint8)


def _covidcxr_load(path: Path, what: str) -> np.ndarray:
    load = loading.load_image if what == "image" else loading.load_mask
    return load(path, SIZE)


def _print_table(totals: dict[str, dict[str, float]], names: list[str]) -> None:
    header = f"{'kind':<28} {'files':>5} " + " ".join(f"{n + ' ms':>11}" for n in names)
    header += f" {'Pillow/libpng':>14}"
    print(header)
    print("-" * len(header))

    def line(label: str, row: dict[str, float]) -> None:
        n = row["n"]
        times = " ".join(f"{row[name] / n:>11.2f}" for name in names)
        print(f"{label:<28} {int(n):>5} {times} {row[names[0]] / row[names[1]]:>13.2f}x")

    for group in ("image", "mask"):
        total: dict[str, float] = defaultdict(float)
        for kind, row in sorted(totals.items(), key=lambda kv: -kv[1][names[0]]):
            if kind.startswith("mask") != (group == "mask"):
                continue
            for key, value in row.items():
                total[key] += value
            line(kind, row)
        if total:
            line(f"all {group}s", total)


def main(argv: Sequence[str] | None = None) -> int:
    """Time both decoders on every file and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    covid = Path(args.shared) / "covid-chestxray"
    images = sorted((covid / "images").iterdir())
    masks = sorted((covid / "annotations" / "v7labs-lung-masks").rglob("*.png"))
    if not images:
        raise SystemExit(f"decode benchmark: no images under {covid}/images; pass --shared")
    print(
        f"decode benchmark: python {platform.python_version()}, Pillow {Image.__version__}, "
        f"one thread, {SIZE} px, best of {args.repeats}"
    )
    jobs = [(path, "image", _kind(path)) for path in images]
    jobs += [(path, "mask", "mask " + _kind(path)) for path in masks]
    for path, _, _ in jobs:
        path.read_bytes()  # into the page cache
    variants = {"covidcxr": _covidcxr_load, "libpng": _libpng_load}
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    differing = 0
    for path, what, kind in jobs:
        outputs = [load(path, what) for load in variants.values()]
        for name, load in variants.items():
            totals[kind][name] += _best_cpu_ms(lambda p=path, w=what, f=load: f(p, w), args.repeats)
        totals[kind]["n"] += 1
        differing += not np.array_equal(outputs[0], outputs[1])
    _print_table(totals, list(variants))
    print(
        "ms: CPU milliseconds per file at 224 px (read, decode, grey, crop, resize); "
        "covidcxr: Pillow decodes (JPEG in draft mode); libpng: 8-bit PNGs decoded by "
        "libpng (imagecodecs), everything else as covidcxr"
    )
    print(f"outputs that differ between them: {differing} of {len(jobs)}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
