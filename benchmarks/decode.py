"""Per-image decode cost of the training loader, by file kind: covidcxr's vs Pillow alone.

For every image (and lung mask) of the collection, times :func:`load_image` (or
:func:`load_mask`) at 224 px as covidcxr runs it (libpng for 8-bit PNGs, reduced JPEG
decoding) and the same call with every file left to Pillow, in one process on one
thread, and prints the CPU milliseconds per file by kind (format, progressive, mode)
with the ratio. The outputs of both are compared pixel for pixel.

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

    plain_png = loading._plain_png
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # n, ours, Pillow
    differing = 0
    for path, what, kind in jobs:
        ours = decode(path, what)
        ours_ms = _best_cpu_ms(lambda p=path, w=what: decode(p, w), args.repeats)
        loading._plain_png = lambda *_: None  # type: ignore[assignment]
        try:
            pillow = decode(path, what)
            pillow_ms = _best_cpu_ms(lambda p=path, w=what: decode(p, w), args.repeats)
        finally:
            loading._plain_png = plain_png
        differing += not np.array_equal(ours, pillow)
        row = totals[kind]
        row[0] += 1
        row[1] += ours_ms
        row[2] += pillow_ms

    header = f"{'kind':<28} {'files':>5} {'covidcxr ms':>11} {'Pillow ms':>9} {'x faster':>8}"
    print(header)
    print("-" * len(header))
    for group in ("image", "mask"):
        n_all = ours_all = pillow_all = 0.0
        for kind, (n, ours_ms, pillow_ms) in sorted(totals.items(), key=lambda kv: -kv[1][2]):
            if kind.startswith("mask") != (group == "mask"):
                continue
            n_all, ours_all, pillow_all = n_all + n, ours_all + ours_ms, pillow_all + pillow_ms
            print(
                f"{kind:<28} {int(n):>5} {ours_ms / n:>11.2f} {pillow_ms / n:>9.2f} "
                f"{pillow_ms / ours_ms:>7.2f}x"
            )
        if n_all:
            print(
                f"{'all ' + group + 's':<28} {int(n_all):>5} {ours_all / n_all:>11.2f} "
                f"{pillow_all / n_all:>9.2f} {pillow_all / ours_all:>7.2f}x"
            )
    print(
        "ms: CPU milliseconds per file for load_image/load_mask at 224 px (read, decode, "
        "grey, crop, resize); Pillow: the same with every file decoded by Pillow"
    )
    print(f"outputs that differ between the two: {differing} of {len(jobs)}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
