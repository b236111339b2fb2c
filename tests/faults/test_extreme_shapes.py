"""79,000,000 x 1 and 1 x 79,000,000 PNGs: that file's error, in bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

from faults_helpers import blank_png, run_child

from conftest import MakeCollection, encode, upstream_row, xray_like

#: Peak resident memory allowed to a check plus an ingest of a source holding the two
#: strips (the interpreter, numpy, Pillow and SQLAlchemy included). Before the shape
#: check, the hash of the 79,000,000 x 1 strip needed 2.9 GB and the other 3.5 GB.
PEAK_RSS_BUDGET_MB = 1024

WORK = """
import json, sys
from covidcxr.ingest.pipeline import check_source, ingest_source
from covidcxr.store.db import open_store

root, data = sys.argv[1], sys.argv[2]
scan = check_source(root, workers=1)
with open_store(f"sqlite:///{data}/s.sqlite", data, create=True) as store:
    outcome = ingest_source(root, store, workers=1)
print(json.dumps({
    "errors": {i.file: [i.code, i.message] for i in scan.report.errors},
    "status": {s.record.filename: s.image_status for s in outcome.scan.records},
    "added": outcome.summary.counts["records_added"],
}))
"""

MEASURE = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], capture_output=True,
                      text=True, check=False)
sys.stderr.write(done.stderr)
print(done.stdout, end="")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def test_strips_are_that_files_error_within_the_memory_budget(
    make_collection: MakeCollection, tmp_path: Path
) -> None:
    images = {
        "wide.png": blank_png(79_000_000, 1),
        "tall.png": blank_png(1, 79_000_000),
        "good.png": encode(xray_like(1)),
    }
    assert all(len(data) < 200_000 for data in images.values())  # tiny on disk
    rows = [upstream_row(patientid=str(i), filename=name) for i, name in enumerate(images)]
    root = make_collection(rows, images=images, annotations=False)
    (tmp_path / "data").mkdir()
    done = run_child(MEASURE, WORK, str(root), str(tmp_path / "data"), timeout=300)
    assert done.returncode == 0, done.stderr
    *lines, peak_kib = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["status"] == {
        "wide.png": "rejected",
        "tall.png": "rejected",
        "good.png": "stored",
    }
    assert result["added"] == 3
    for name, size in (("wide.png", "79000000x1"), ("tall.png", "1x79000000")):
        code, message = result["errors"][f"images/{name}"]
        assert code == "extreme_shape" and size in message and "20:1" in message
    peak_mb = int(peak_kib) / 1024
    print(f"peak RSS of check + ingest on the strips: {peak_mb:.0f} MB")
    assert peak_mb < PEAK_RSS_BUDGET_MB
