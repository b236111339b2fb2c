"""Per-image decode cost of the training loader, by file kind: covidcxr's vs Pillow alone.

For every image (and lung mask) of the collection, times :func:`load_image` (or
:func:`load_mask`) at 224 px as covidcxr runs it (8-bit PNGs inflated by libdeflate and
unfiltered by its C extension, reduced JPEG decoding, the resize by its second C
extension), the same call with libpng decoding those PNGs, and with every file decoded
and resized by Pillow (as where neither extension was built), in one process on one
thread, and prints the CPU milliseconds per file by kind
(format, progressive, mode) with the ratios. The outputs are compared pixel for pixel.

This is where a first epoch's time goes: ``benchmarks/loader.py`` times whole passes.

Usage::

    python benchmarks/decode.py [--shared ../shared/datasets] [--repeats 3]

Reads the files in place; writes nothing.
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


def main(argv: Sequence[str] | None = None) -> int:
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

    def decode(path: Path, what: str) -> np.ndarray:
        load = loading.load_image if what == "image" else loading.load_mask
        return load(path, SIZE)

    # covidcxr as installed; with libpng for PNGs; Pillow alone (no C extension).
    variants: dict[str, dict[str, object]] = {"covidcxr": {}}
    if loading.NATIVE_PNG:
        variants["libpng"] = {"_unfilter": None}
    variants["Pillow"] = {"_plain_png": lambda *_: None, "_resizer": None}
    saved = {name: getattr(loading, name) for name in ("_unfilter", "_plain_png", "_resizer")}
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    differing = 0
    for path, what, kind in jobs:
        outputs = []
        for variant, patch in variants.items():
            for name, value in patch.items():
                setattr(loading, name, value)
            try:
                outputs.append(decode(path, what))
                ms = _best_cpu_ms(lambda p=path, w=what: decode(p, w), args.repeats)
            finally:
                for name, value in saved.items():
                    setattr(loading, name, value)
            totals[kind][variant] += ms
        totals[kind]["n"] += 1
        differing += any(not np.array_equal(outputs[0], other) for other in outputs[1:])

    names = list(variants)
    header = f"{'kind':<28} {'files':>5} " + " ".join(f"{n + ' ms':>11}" for n in names)
    header += " " + " ".join(f"{'vs ' + n:>10}" for n in names[1:])
    print(header)
    print("-" * len(header))

    def line(label: str, row: dict[str, float]) -> None:
        n = row["n"]
        times = " ".join(f"{row[name] / n:>11.2f}" for name in names)
        ratios = " ".join(f"{row[name] / row['covidcxr']:>9.2f}x" for name in names[1:])
        print(f"{label:<28} {int(n):>5} {times} {ratios}")

    for group in ("image", "mask"):
        total: dict[str, float] = defaultdict(float)
        for kind, row in sorted(totals.items(), key=lambda kv: -kv[1]["Pillow"]):
            if kind.startswith("mask") != (group == "mask"):
                continue
            for key, value in row.items():
                total[key] += value
            line(kind, row)
        if total:
            line(f"all {group}s", total)
    print(
        "ms: CPU milliseconds per file for load_image/load_mask at 224 px (read, decode, "
        "grey, crop, resize); vs X: how many times covidcxr's time X's is"
    )
    print(
        "covidcxr: 8-bit PNGs inflated by libdeflate, unfiltered and made grey by covidcxr's C "
        "extension"
        if loading.NATIVE_PNG
        else "covidcxr: the C extension was not built, so 8-bit PNGs go to libpng"
    )
    print(
        "covidcxr: grey images resized by covidcxr's C extension"
        if loading.NATIVE_RESIZE
        else "covidcxr: the resize extension was not built, so Pillow resizes"
    )
    print("libpng: the same with 8-bit PNGs decoded by libpng")
    print("Pillow: every file decoded and resized by Pillow (as without the C extensions)")
    print(f"outputs that differ between them: {differing} of {len(jobs)}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
