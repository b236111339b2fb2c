"""Load on ``covidcxr serve`` over loopback: list queries while images are predicted.

Builds a store from the real collection (or uses ``--db``/``--data-dir``), starts
``covidcxr serve`` on a free loopback port, and for ``--seconds`` drives it with
``--list-clients`` clients sending filtered ``GET /api/v1/images`` pages and
``--predict-clients`` clients uploading collection images to ``POST /api/v1/predict``
(one image per request). Prints requests, errors, throughput and p50/p95/p99 latency
per kind, and the server's peak RSS. The baseline, in the same run: the images per
second of the library call ``covidcxr predict`` makes (``engine.predict_files``, model
already loaded) on the same images.

Usage::

    python benchmarks/serve_load.py [--shared ../shared/datasets] [--seconds 20]
        [--list-clients 32] [--predict-clients 4] [--images 16]

Needs the ``serve`` extra (uvicorn, httpx). Writes only to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FILTERS: list[dict[str, Any]] = [
    {},
    {"finding": "COVID-19"},
    {"view": "PA"},
    {"sex": "F", "age_min": 40},
    {"finding": "viral", "has_severity": "true"},
    {"modality": "X-ray", "view": "frontal"},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _build_store(shared: Path, data_dir: Path) -> str:
    from covidcxr.ingest.pipeline import ingest_source
    from covidcxr.store.db import open_store

    url = f"sqlite:///{data_dir / 'store.sqlite'}"
    started = time.perf_counter()
    with open_store(url, data_dir, create=True) as store:
        ingest_source(shared / "covid-chestxray", store, name="covid-chestxray")
        store.analyze()
    print(f"store: ingested covid-chestxray in {time.perf_counter() - started:.1f} s")
    return url


def _start_server(
    url: str, data_dir: Path, port: int, threads: int | None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "covidcxr", "serve", "--port", str(port), "--db", url]
    # No rate limit here: every client shares the loopback address.
    command += ["--data-dir", str(data_dir), "--predict-per-minute", "1000000"]
    if threads:
        command += ["--inference-threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=60).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    _, errors = server.communicate()
    tail = errors.decode("utf-8", "replace")[-2000:]
    raise SystemExit(f"serve_load: the server did not answer /api/v1/health:\n{tail}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _client(
    kind: str, base: str, stop: float, results: dict[str, Any], images: list[Path]
) -> None:
    rng = random.Random(hash(kind) ^ id(results))
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                if kind == "list":
                    params = {**rng.choice(FILTERS), "limit": 48, "offset": rng.choice([0, 48, 96])}
                    response = await http.get("/api/v1/images", params=params)
                else:
                    image = rng.choice(images)
                    files = [("file", (image.name, image.read_bytes(), "image/png"))]
                    response = await http.post("/api/v1/predict", files=files)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            results[kind]["latency"].append(time.perf_counter() - started)
            results[kind]["errors"] += 0 if ok else 1


async def _drive(
    base: str, seconds: float, list_clients: int, predict_clients: int, images: list[Path]
) -> dict[str, Any]:
    results: dict[str, Any] = {k: {"latency": [], "errors": 0} for k in ("list", "predict")}
    stop = time.monotonic() + seconds
    tasks = [_client("list", base, stop, results, images) for _ in range(list_clients)]
    tasks += [_client("predict", base, stop, results, images) for _ in range(predict_clients)]
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    results["elapsed"] = time.perf_counter() - started
    return results


def _baseline(images: list[Path]) -> float:
    """Images per second of ``engine.predict_files`` (what ``covidcxr predict`` runs),
    in the faster of two passes."""
    from covidcxr.models.bundle import load_bundle
    from covidcxr.models.engines import make_engine

    engine = make_engine(load_bundle(None))
    engine.predict_files(images[:1])  # warm-up
    best = float("inf")
    for _ in range(2):  # the better of two passes: other programs share the CPUs
        started = time.perf_counter()
        for image in images:  # one image per call, as each upload is one request
            engine.predict_files([image])
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main() -> int:
    """Run the load test and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--list-clients", type=int, default=32)
    parser.add_argument("--predict-clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="collection images to upload")
    parser.add_argument(
        "--inference-threads", type=int, help="the server's network threads (default: torch's)"
    )
    args = parser.parse_args()
    folder = args.shared / "covid-chestxray" / "images"
    if not folder.is_dir():
        raise SystemExit(f"serve_load: {folder} not found; pass --shared")
    images = sorted(folder.glob("*.png"))[: args.images]
    with tempfile.TemporaryDirectory(prefix="covidcxr-serve-load-") as temporary:
        data_dir = Path(temporary)
        url = _build_store(args.shared, data_dir)
        baseline = _baseline(images)
        port = _free_port()
        server = _start_server(url, data_dir, port, args.inference_threads)
        try:
            base = f"http://127.0.0.1:{port}"
            clients = (args.list_clients, args.predict_clients)
            cpu, load = _cpu_seconds(server.pid), os.getloadavg()[0]
            own = time.process_time()
            results = asyncio.run(_drive(base, args.seconds, *clients, images))
            results["client_cpu"] = time.process_time() - own
            results["server_cpu"] = _cpu_seconds(server.pid) - cpu
            results["load"] = (load, os.getloadavg()[0])
            peak = _peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    _print(results, args, baseline, peak)
    return 0


def _print(results: dict[str, Any], args: argparse.Namespace, baseline: float, peak: float) -> None:
    elapsed = results["elapsed"]
    print(
        f"\n{args.list_clients} list clients + {args.predict_clients} predict clients for "
        f"{elapsed:.1f} s on {os.cpu_count()} CPUs (loopback)\n"
    )
    header = ("kind", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms")
    print(f"{header[0]:<8} " + " ".join(f"{h:>8}" for h in header[1:]))
    for kind in ("list", "predict"):
        latency = [t * 1000 for t in results[kind]["latency"]]
        print(
            f"{kind:<8} {len(latency):>8} {results[kind]['errors']:>8} "
            f"{len(latency) / elapsed:>8.1f} {_percentile(latency, 50):>8.0f} "
            f"{_percentile(latency, 95):>8.0f} {_percentile(latency, 99):>8.0f}"
        )
    served = len(results["predict"]["latency"]) / elapsed
    print(
        f"\npredict: {served:.2f} images/s served under load vs {baseline:.2f} images/s "
        f"for engine.predict_files alone (ratio {served / baseline:.2f}; goal >= 0.80)"
    )
    median = statistics.median(results["list"]["latency"]) if results["list"]["latency"] else 0
    print(f"list median {median * 1000:.0f} ms; server peak RSS {peak:.0f} MB")
    requests = sum(len(results[kind]["latency"]) for kind in ("list", "predict"))
    server, client = results["server_cpu"], results["client_cpu"]
    print(
        f"CPU over the run: server {server:.1f} s ({1000 * server / max(requests, 1):.1f} ms a "
        f"request), these clients {client:.1f} s, of {elapsed * (os.cpu_count() or 1):.0f} s; "
        f"load average {results['load'][0]:.2f} before, {results['load'][1]:.2f} after "
        "(other programs share these CPUs)"
    )


if __name__ == "__main__":
    sys.exit(main())
