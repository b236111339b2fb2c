"""check reports progress through the same callback as ingest."""

from __future__ import annotations

from conftest import MakeCollection
from covidcxr.ingest.pipeline import check_source


def test_check_source_reports_each_phase_up_to_its_total(make_collection: MakeCollection) -> None:
    calls: list[tuple[str, int, int]] = []
    scan = check_source(make_collection(), workers=1, progress=lambda *c: calls.append(c))
    assert scan.report.errors == []
    assert calls, "no progress reported"
    last = {}
    for phase, done, total in calls:
        assert 0 <= done <= total
        last[phase] = (done, total)
    assert all(done == total for done, total in last.values())
