"""Loader throughput and memory: covidcxr's CollectionDataset vs torchxrayvision.

Runs, in one invocation and on the same images and views:

1. torchxrayvision's ``COVID19_Dataset`` (``views=["PA", "AP"]``,
   ``transform=Compose([XRayCenterCrop(), XRayResizer(224)])``), one pass;
2. covidcxr's ``CollectionDataset`` (same views, 224 px, center crop): a first pass
   on an empty preprocessing cache, then cached passes;

each through a ``DataLoader`` (batch size 16) with ``num_workers`` 0 and 2, and prints
images/s and the ratio to torchxrayvision with the same number of workers. Then it
builds synthetic collections of growing size, iterates one cached epoch of each in a
fresh process and prints the peak memory.

Usage::

    python benchmarks/loader.py [--shared ../shared/datasets] [--quick]
                                [--db URL --data-dir DIR] [--torch-threads N]

Everything is written to a temporary directory (or the store given with
``--db``/``--data-dir``, which is reused as it is when it already holds the source);
nothing is written under ``--shared``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from covidcxr.dataset.samples import Selection, build_samples  # noqa: E402
from covidcxr.dataset.tasks import get_task  # noqa: E402
from covidcxr.ingest.pipeline import ingest_source  # noqa: E402
from covidcxr.store import queries  # noqa: E402
from covidcxr.store.db import Store, open_store  # noqa: E402

SIZE = 224
BATCH_SIZE = 16
VIEWS = ("PA", "AP")
SOURCE = "covid-chestxray"
SYNTHETIC_IMAGES = 300


@dataclass
class Timing:
    """One timed configuration: wall time per pass and CPU time per image."""

    loader: str
    workers: int
    run: str
    images: int
    seconds: float
    cpu_per_image: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(loader: Any) -> float:
    """CPU time of this process (all threads) and of the loader's live workers.

    Unlike wall time, it hardly changes when other programs share the machine, so the
    CPU-time ratio is the one to trust on a busy machine.
    """
    total = time.process_time()
    iterator = getattr(loader, "_iterator", None)
    for worker in getattr(iterator, "_workers", []):
        try:
            stat = Path(f"/proc/{worker.pid}/stat").read_text(encoding="ascii")
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class MachineShare:
    """What else used the CPUs while the benchmark ran, as fractions of all of them."""

    others: float  # CPU time of other programs (all busy time less this process's)
    steal: float  # time the hypervisor gave the virtual CPUs to other machines


def _machine_counters() -> tuple[float, float, float, float] | None:
    """Wall seconds, busy and steal CPU seconds of the machine (from /proc/stat), and
    this process's CPU seconds with its finished children's; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = (user + nice + system + irq + softirq) / _TICKS_PER_SECOND
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    return time.perf_counter(), busy, steal / _TICKS_PER_SECOND, mine


def _machine_share(
    before: tuple[float, float, float, float] | None,
    after: tuple[float, float, float, float] | None,
) -> MachineShare | None:
    if before is None or after is None:
        return None
    wall, busy, steal, mine = (b - a for a, b in zip(before, after, strict=True))
    capacity = wall * (os.cpu_count() or 1)
    return MachineShare(max(0.0, busy - mine) / capacity, steal / capacity)


def _time_pass(loader: Any) -> tuple[int, float, float]:
    """Images, wall seconds and CPU seconds of one pass."""
    cpu = _cpu_seconds(loader)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["idx"])
    return count, time.perf_counter() - start, _cpu_seconds(loader) - cpu


def _time_passes(loader: Any, passes: int, min_seconds: float) -> tuple[int, float, float]:
    """At least ``passes`` passes and ``min_seconds`` seconds: images per pass, the
    median wall seconds of a pass, and CPU seconds per image over all of them."""
    counts, times, cpus = [], [], []
    while len(times) < passes or sum(times) < min_seconds:
        count, seconds, cpu = _time_pass(loader)
        counts.append(count)
        times.append(seconds)
        cpus.append(cpu)
    return counts[0], statistics.median(times), sum(cpus) / max(sum(counts), 1)


def _warm_page_cache(paths: Iterable[Path]) -> None:
    """Read files once so that both loaders start from the OS page cache."""
    for path in paths:
        path.read_bytes()


# -- the real collection ----------------------------------------------------------------


def _store_with_source(args: argparse.Namespace, workdir: Path, covid: Path) -> Store:
    if args.db or args.data_dir:
        store = open_store(args.db, args.data_dir, create=True)  # the usual defaults otherwise
    else:
        store = open_store(f"sqlite:///{workdir / 'store.sqlite'}", workdir / "data", create=True)
    with store.read() as conn:
        present = queries.count_records(conn, queries.RecordFilter(sources=[SOURCE]))
    if not present:
        _log(f"ingesting {covid} into {store.data_dir} ...")
        start = time.perf_counter()
        ingest_source(covid, store, workers=2, report_dir=workdir / "reports")
        _log(f"  done in {time.perf_counter() - start:.1f} s")
    return store


def _xrv_dataset(covid: Path) -> tuple[Any, list[int]]:
    import torchxrayvision as xrv
    from torchvision.transforms import Compose

    state = np.random.get_state()  # COVID19_Dataset reseeds numpy's global generator
    dataset = xrv.datasets.COVID19_Dataset(
        imgpath=str(covid / "images"),
        csvpath=str(covid / "metadata.csv"),
        views=list(VIEWS),
        transform=Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(SIZE)]),
    )
    np.random.set_state(state)
    present = [
        i for i, name in enumerate(dataset.csv["filename"]) if (covid / "images" / name).is_file()
    ]
    return dataset, present


def _compare_selection(xrv_dataset: Any, present: list[int], ours: Any) -> list[str]:
    """Say how the two selections relate (they should hold the same images)."""
    theirs = sorted(str(xrv_dataset.csv["filename"].iloc[i]) for i in present)
    mine = sorted(str(name) for name in ours.csv["filename"])
    lines = [
        f"torchxrayvision: {len(xrv_dataset)} rows with view PA/AP and a finding other than "
        f"todo/Unknown; {len(xrv_dataset) - len(present)} of them name a file that is not in "
        f"images/ (torchxrayvision would raise FileNotFoundError on those, so both loaders "
        f"are timed on the {len(present)} others)",
        f"covidcxr: {len(ours)} samples; left out: "
        + ", ".join(f"{reason}: {n}" for reason, n in ours.summary()["excluded"].items()),
        "same rows (file names) in both: " + ("yes" if theirs == mine else "NO"),
    ]
    if theirs != mine:
        only_theirs = sorted(set(theirs) - set(mine))[:10]
        only_mine = sorted(set(mine) - set(theirs))[:10]
        lines.append(f"  only in torchxrayvision: {only_theirs}; only in covidcxr: {only_mine}")
    return lines


def _loader(dataset: Any, workers: int) -> Any:
    """In order (no shuffling), batch 16; workers persist across passes, as in training."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def throughput(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[Timing], dict[tuple[str, int], float]]:
    """Time both loaders on the real collection: the fastest first pass of each loader
    and number of workers (then its cached passes), and the median first-pass rates."""
    from covidcxr.dataset.torch_dataset import CollectionDataset

    covid = Path(args.shared) / SOURCE
    if not (covid / "metadata.csv").is_file():
        raise SystemExit(f"loader benchmark: {covid}/metadata.csv not found; pass --shared")
    store = _store_with_source(args, workdir, covid)
    selection = Selection(
        views=VIEWS, modalities=("X-ray",), sources=(SOURCE,), one_per_image=False
    )
    with store:
        samples = build_samples(store, get_task("findings"), selection)

    _log("building torchxrayvision's COVID19_Dataset ...")
    with warnings.catch_warnings():
        # torchxrayvision's import chain (skimage, imageio) is not ours to keep quiet
        # forever; silence it here only.
        warnings.simplefilter("ignore")
        xrv_dataset, present = _xrv_dataset(covid)
    full = CollectionDataset(samples, size=SIZE, cache_dir=None, masks=False)
    for line in _compare_selection(xrv_dataset, present, full):
        print(line)
    limit = args.images or (48 if args.quick else None)
    xrv_indices = present[:limit] if limit else present
    our_indices = list(range(len(full)))[:limit] if limit else list(range(len(full)))
    _warm_page_cache(covid / "images" / xrv_dataset.csv["filename"].iloc[i] for i in present)
    _warm_page_cache(samples.image_path(s) for s in samples.samples)
    _warm_page_cache(p for s in samples.samples if (p := samples.mask_path(s)) is not None)
    timed_theirs = [str(xrv_dataset.csv["filename"].iloc[i]) for i in xrv_indices]
    names = full.csv["filename"]
    timed_mine = [str(names.iloc[i]) for i in our_indices]
    print(
        f"timed on {len(xrv_indices)} images (the same rows in the same order: "
        f"{'yes' if timed_theirs == timed_mine else 'NO'}), batch size {BATCH_SIZE}, {SIZE} px"
    )

    # First passes are repeated, interleaved (torchxrayvision, then ours, then again), and
    # the fastest of each is reported: on a shared machine that is the least noisy
    # estimate, and interleaving gives both loaders the same quiet and busy moments.
    # Each of ours starts on an empty cache, in the data directory when one is given
    # (where covidcxr keeps its cache by default). The caches are all removed after the
    # timing, not between passes: ext4 checks every inode deleted in the last minutes
    # when it creates a file, and a training run's first epoch does not follow the
    # deletion of a cache.
    cache_parent = Path(args.data_dir) if args.data_dir else workdir
    cache_parent.mkdir(parents=True, exist_ok=True)
    caches: list[Path] = []
    try:
        return _interleaved_passes(
            args, samples, xrv_dataset, xrv_indices, our_indices, cache_parent, caches
        )
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)


def _interleaved_passes(
    args: argparse.Namespace,
    samples: Any,
    xrv_dataset: Any,
    xrv_indices: list[int],
    our_indices: list[int],
    cache_parent: Path,
    caches: list[Path],
) -> tuple[list[Timing], dict[tuple[str, int], float]]:
    """The first passes of both loaders, interleaved, and the cached passes of ours
    after the last; ``caches`` collects the caches made, for the caller to remove."""
    from torch.utils.data import Subset

    from covidcxr.dataset.torch_dataset import CollectionDataset

    first: dict[tuple[str, int], list[Timing]] = {}
    cached: dict[tuple[str, int], Timing] = {}
    workers_list = (0, 2)
    for repeat in range(args.first_passes):
        last = repeat == args.first_passes - 1
        for workers in workers_list:
            _log(f"torchxrayvision, {workers} workers, pass {repeat + 1} ...")
            loader = _loader(Subset(xrv_dataset, xrv_indices), workers)
            count, seconds, cpu = _time_pass(loader)
            timing = Timing("torchxrayvision", workers, "one pass", count, seconds, cpu / count)
            first.setdefault(("torchxrayvision", workers), []).append(timing)
            del loader  # stops its workers
        for masks in (False, True):
            name = "covidcxr" + (" +masks" if masks else "")
            for workers in workers_list:
                cache = Path(tempfile.mkdtemp(prefix="covidcxr-bench-cache-", dir=cache_parent))
                caches.append(cache)
                dataset = CollectionDataset(
                    samples, size=SIZE, cache_dir=cache, indices=our_indices, masks=masks
                )
                _log(f"{name}, {workers} workers, first pass {repeat + 1} ...")
                loader = _loader(dataset, workers)
                # The first pass includes starting the workers, as torchxrayvision's does.
                count, seconds, cpu = _time_pass(loader)
                timing = Timing(name, workers, "first pass", count, seconds, cpu / count)
                first.setdefault((name, workers), []).append(timing)
                if last:
                    passes = _time_passes(loader, args.cached_passes, args.min_seconds)
                    cached[name, workers] = Timing(name, workers, "cached pass", *passes)
                del loader
    timings = []
    for key, runs in first.items():
        timings.append(min(runs, key=lambda t: t.seconds))
        if key in cached:
            timings.append(cached[key])
    medians = {key: statistics.median(t.rate for t in runs) for key, runs in first.items()}
    return timings, medians


def print_throughput(
    timings: Sequence[Timing],
    medians: dict[tuple[str, int], float],
    first_passes: int,
    machine: MachineShare | None,
) -> None:
    """The table, and the goals."""
    baseline = {t.workers: t for t in timings if t.loader == "torchxrayvision"}
    header = (
        f"{'loader':<16} {'workers':>7} {'pass':<11} {'images':>6} {'seconds':>7} "
        f"{'images/s':>8} {'x xrv same workers':>18} {'x xrv 0 workers':>15} "
        f"{'CPU ms/img':>10} {'x xrv by CPU':>12}"
    )
    print()
    print(header)
    print("-" * len(header))
    for t in timings:
        same = t.rate / baseline[t.workers].rate
        single = t.rate / baseline[0].rate
        by_cpu = baseline[t.workers].cpu_per_image / t.cpu_per_image
        print(
            f"{t.loader:<16} {t.workers:>7} {t.run:<11} {t.images:>6} {t.seconds:>7.2f} "
            f"{t.rate:>8.1f} {same:>17.1f}x {single:>14.1f}x "
            f"{t.cpu_per_image * 1000:>10.2f} {by_cpu:>11.1f}x"
        )
    print(
        "x xrv same workers: images/s over torchxrayvision's with as many DataLoader "
        "workers; x xrv by CPU: torchxrayvision's CPU time per image over ours (same "
        "workers; main process, its threads and the workers), which other programs on "
        "the machine hardly change"
    )
    if first_passes > 1:
        print(
            f"one pass, first pass: the fastest of {first_passes}, interleaved with the other "
            "loader's (each of covidcxr's on an empty cache, its workers started anew); "
            "cached pass: the median of the last one's"
        )

    def find(run: str, workers: int) -> Timing:
        return next(
            t for t in timings if t.loader == "covidcxr" and t.run == run and t.workers == workers
        )

    best_xrv = max(baseline.values(), key=lambda t: t.rate)
    print()
    for run, goal in (("first pass", 6.0), ("cached pass", 100.0)):
        best = max((find(run, w) for w in baseline), key=lambda t: t.rate)
        best_ratio = best.rate / best_xrv.rate
        same = ", ".join(
            f"{find(run, w).rate / baseline[w].rate:.1f}x with {w} workers each"
            for w in sorted(baseline)
        )
        by_cpu = ", ".join(
            f"{baseline[w].cpu_per_image / find(run, w).cpu_per_image:.1f}x with {w}"
            for w in sorted(baseline)
        )
        verdict = "met" if best_ratio >= goal else "NOT met"
        median = ""
        if run == "first pass" and first_passes > 1:
            ours = max(medians["covidcxr", w] for w in baseline)
            theirs = max(medians["torchxrayvision", w] for w in baseline)
            median = f" (medians of the {first_passes} passes, best vs best: {ours / theirs:.1f}x)"
        print(
            f"goal {run} >= {goal:.0f}x torchxrayvision: best vs best ({best.workers} vs "
            f"{best_xrv.workers} workers) {best_ratio:.1f}x -> {verdict}{median}; like for "
            f"like: {same}; by CPU time: {by_cpu}"
        )
    if machine is None:
        return
    print(
        f"while timing: other programs used {machine.others:.0%} of the {os.cpu_count()} "
        f"CPUs, the hypervisor held back {machine.steal:.0%} (steal)"
    )
    if machine.others > 0.05 or machine.steal > 0.05:
        print(
            "warning: the machine was shared, so wall-clock ratios are unreliable; trust "
            "the CPU-time ratios or rerun on a quiet machine"
        )


# -- memory -------------------------------------------------------------------------------


def _synthetic_source(folder: Path, rows: int) -> Path:
    """``rows`` metadata rows over SYNTHETIC_IMAGES distinct 256x256 images."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256] / 256.0
    for k in range(SYNTHETIC_IMAGES):
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        picture = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.08) * 200
        picture += rng.normal(0, 10, size=picture.shape)
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(images / f"i{k}.png")
    header = [
        "patientid", "offset", "sex", "age", "finding", "view", "modality", "folder",
        "filename", "license",
    ]  # fmt: skip
    findings = ("COVID-19", "Streptococcus", "No Finding", "Pneumonia", "SARS")
    with (folder / "metadata.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(rows):
            writer.writerow(
                [
                    str(i // 2),
                    str(i % 2 * 3),
                    "MF"[i % 2],
                    str(20 + i % 60),
                    findings[i % len(findings)],
                    ("PA", "AP")[i % 2],
                    "X-ray",
                    "images",
                    f"i{i % SYNTHETIC_IMAGES}.png",
                    "CC BY 4.0",
                ]
            )
    return folder


def _proc_kib(pid: int | str, file: str, field: str) -> int:
    """A ``field: N kB`` value from ``/proc/<pid>/<file>``, in bytes."""
    with Path(f"/proc/{pid}/{file}").open(encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _proc_kib("self", "status", "VmRSS")


def _peak_bytes() -> int:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child started by
    # a big parent would report the parent's peak.
    return _proc_kib("self", "status", "VmHWM")


def _worker_private_bytes(loader: Any) -> int:
    """The largest private (unshared) memory of the loader's live workers."""
    iterator = getattr(loader, "_iterator", None)
    largest = 0
    for worker in getattr(iterator, "_workers", []):
        private = sum(
            _proc_kib(worker.pid, "smaps_rollup", field)
            for field in ("Private_Clean", "Private_Dirty")
        )
        largest = max(largest, private)
    return largest


def memory_child(store_dir: Path, workers: int) -> dict[str, Any]:
    """In a fresh process: build the dataset, one warm-up and one cached epoch."""
    import pickle

    import torch

    from covidcxr.dataset.torch_dataset import CollectionDataset

    torch.set_num_threads(1)
    result: dict[str, Any] = {"rss_after_imports": _rss_bytes()}
    with open_store(
        f"sqlite:///{store_dir / 'store.sqlite'}", store_dir / "data", create=True
    ) as store:
        samples = build_samples(
            store, get_task("findings"), Selection(views=VIEWS, one_per_image=False)
        )
    result["peak_after_build_samples"] = _peak_bytes()
    dataset = CollectionDataset(samples, size=SIZE, cache_dir=store_dir / "cache")
    del samples
    gc.collect()
    result["samples"] = len(dataset)
    result["dataset_pickle_bytes"] = len(pickle.dumps(dataset))
    result["rss_dataset_built"] = _rss_bytes()
    loader = _loader(dataset, workers)
    _time_pass(loader)  # fills the cache (SYNTHETIC_IMAGES decodes)
    rss_before = _rss_bytes()
    count, seconds, _ = _time_pass(loader)
    result["epoch_images"] = count
    result["epoch_seconds"] = seconds
    result["rss_growth_in_epoch"] = _rss_bytes() - rss_before
    result["peak_main"] = _peak_bytes()
    result["worker_private"] = _worker_private_bytes(loader)
    return result


def memory(sizes: Sequence[int], workdir: Path, workers: int) -> list[dict[str, Any]]:
    """Build each synthetic collection and measure it in a fresh process."""
    results = []
    for rows in sizes:
        folder = workdir / f"synthetic-{rows}"
        _log(f"synthetic collection of {rows} rows ...")
        source = _synthetic_source(folder / "source", rows)
        with open_store(
            f"sqlite:///{folder / 'store.sqlite'}", folder / "data", create=True
        ) as store:
            ingest_source(source, store, name="synthetic", report_dir=folder / "reports")
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(folder), "--workers", str(workers)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"memory child for {rows} rows failed:\n{done.stderr}")
        results.append({"rows": rows, **json.loads(done.stdout.strip().splitlines()[-1])})
    return results


def print_memory(results: Sequence[dict[str, Any]], workers: int) -> None:
    """The memory table."""

    def mib(value: float) -> str:
        return f"{value / 2**20:.1f}"

    print()
    print(
        f"memory: synthetic collections ({SYNTHETIC_IMAGES} distinct 256x256 PNGs, one metadata "
        f"row per sample, half PA half AP), {SIZE} px, one cached epoch, DataLoader "
        f"{workers} workers, batch {BATCH_SIZE}; MiB"
    )
    header = (
        f"{'rows':>7} {'samples':>7} {'imports':>8} {'peak build':>11} {'dataset':>8} "
        f"{'B/sample':>9} {'epoch +RSS':>11} {'peak main':>10} {'worker priv':>12} "
        f"{'epoch img/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['rows']:>7} {r['samples']:>7} {mib(r['rss_after_imports']):>8} "
            f"{mib(r['peak_after_build_samples']):>11} {mib(r['dataset_pickle_bytes']):>8} "
            f"{r['dataset_pickle_bytes'] / max(r['samples'], 1):>9.0f} "
            f"{mib(r['rss_growth_in_epoch']):>11} {mib(r['peak_main']):>10} "
            f"{mib(r['worker_private']):>12} {r['epoch_images'] / r['epoch_seconds']:>12.0f}"
        )
    print(
        "imports: RSS after importing torch and covidcxr; peak build: peak RSS (VmHWM) "
        "after build_samples (the SampleSet and the database rows, dropped once the "
        "dataset is built); dataset: the dataset pickled (all it holds); epoch +RSS: RSS "
        "growth of the main process during the cached epoch; peak main: its VmHWM at the "
        "end; worker priv: largest private (not shared with the parent) memory of a "
        "DataLoader worker after the epoch"
    )


# -- main -------------------------------------------------------------------------------


def _environment(threads: int) -> str:
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load}, torch threads {threads}, "
        f"Pillow {Image.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test)")
    parser.add_argument("--db", help="reuse this store (database URL)")
    parser.add_argument("--data-dir", help="reuse this store's data directory")
    parser.add_argument("--images", type=int, help="time only the first N images")
    parser.add_argument(
        "--first-passes",
        type=int,
        help="first passes of each loader, the fastest reported (default 3, --quick 1)",
    )
    parser.add_argument(
        "--cached-passes", type=int, default=5, help="cached passes (median reported)"
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        help="repeat cached passes for this long (default 2, --quick 0.3)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads in this process (DataLoader workers use 1); on a "
        "2-core machine 2 threads make default_collate's torch.stack far slower",
    )
    parser.add_argument("--sizes", help="synthetic collection sizes, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="workers in the memory runs")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.min_seconds is None:
        args.min_seconds = 0.3 if args.quick else 2.0
    if args.first_passes is None:
        args.first_passes = 1 if args.quick else 3
    if args.first_passes < 1:
        parser.error(f"--first-passes must be at least 1, got {args.first_passes}")

    if args.memory_child:
        print(json.dumps(memory_child(Path(args.memory_child), args.workers)))
        return 0

    import torch

    torch.set_num_threads(args.torch_threads)
    print(f"loader benchmark ({'quick' if args.quick else 'full'}): " + _environment(
        args.torch_threads
    ))  # fmt: skip
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([1_000] if args.quick else [1_000, 10_000, 50_000])
    )
    with tempfile.TemporaryDirectory(prefix="covidcxr-bench-") as temporary:
        workdir = Path(temporary)
        if not args.skip_throughput:
            before = _machine_counters()
            timings, medians = throughput(args, workdir)
            gc.collect()  # the last loaders' workers are joined, so their CPU time counts
            machine = _machine_share(before, _machine_counters())
            print_throughput(timings, medians, args.first_passes, machine)
            if args.quick or args.images:
                print(
                    f"(a run on {timings[0].images} images: a smoke test; the goals are "
                    "measured on every image, without --quick or --images)"
                )
        if not args.skip_memory:
            print_memory(memory(sizes, workdir, args.workers), args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
