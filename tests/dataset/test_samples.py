"""build_samples: selection, labels, and every exclusion counted."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.dataset import samples as s
from covidcxr.dataset.tasks import NO_FINDING_ASSIGNED, TOO_UNSPECIFIC, get_task
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store import queries
from covidcxr.store.db import Store, open_store


@pytest.fixture
def store(make_collection: MakeCollection, tmp_path: Path) -> Store:
    rows = [
        upstream_row(patientid="1", filename="a.png"),  # COVID-19, PA
        upstream_row(patientid="1", filename="a-lat.png", view="L"),
        upstream_row(patientid="2", filename="b.png", finding="Streptococcus", view="AP"),
        upstream_row(patientid="3", filename="c.png", finding="todo"),
        upstream_row(patientid="4", filename="ct.png", view="Axial", modality="CT"),
        upstream_row(patientid="5", filename="gone.png"),
        upstream_row(patientid="6", filename="a.png"),  # same file as patient 1
        upstream_row(patientid="7", filename="d.png", finding="Pneumonia", survival="N"),
        upstream_row(patientid="8", filename="e.png", view=""),
    ]
    images = {
        name: encode(xray_like(i))
        for i, name in enumerate(
            ["a.png", "a-lat.png", "b.png", "c.png", "ct.png", "d.png", "e.png"]
        )
    }
    root = make_collection(rows, images=images)
    (root / "annotations" / "covid-severity-scores.csv").write_text(
        "filename,geographic_mean,opacity_mean\na.png,4.5,3.0\n", encoding="utf-8"
    )
    mask = np.zeros((96, 80), dtype=np.uint8)
    mask[20:70, 10:70] = 255
    (root / "annotations" / "lungVAE-masks" / "a_mask.png").write_bytes(encode(mask))
    opened = open_store(f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "data", create=True)
    ingest_source(root, opened)
    return opened


def test_exclusions_are_counted_with_reasons(store: Store) -> None:
    result = s.build_samples(store, get_task("covid-vs-other-pneumonia"))
    assert [x.patient for x in result.samples] == ["tiny:1", "tiny:2"]
    assert result.samples[0].labels == (1.0,) and result.samples[1].labels == (0.0,)
    assert dict(result.excluded) == {
        s.VIEW_NOT_SELECTED: 2,  # lateral, unknown view
        NO_FINDING_ASSIGNED: 1,  # todo
        s.MODALITY_NOT_SELECTED: 1,  # CT
        s.IMAGE_MISSING: 1,
        s.SAME_IMAGE: 1,  # patient 6's row uses patient 1's file
        TOO_UNSPECIFIC: 1,  # "Pneumonia"
    }
    total = len(result.samples) + sum(result.excluded.values())
    assert total == 9
    summary = result.summary()
    assert summary["samples"] == 2 and summary["patients"] == 2
    assert summary["labels"]["Pneumonia/Viral/COVID-19"] == {
        "positive": 1,
        "negative": 1,
        "unknown": 0,
    }


def test_samples_carry_paths_severity_mask_and_metadata(store: Store) -> None:
    result = s.build_samples(store, get_task("severity"))
    (sample,) = result.samples
    assert sample.labels == (4.5, 3.0) and sample.severity == (4.5, 3.0)
    assert sample.mask_sha256 is not None and sample.mask_annotator == "lungVAE"
    assert result.image_path(sample).is_file()
    mask = result.mask_path(sample)
    assert mask is not None and mask.is_file()
    assert sample.metadata["view"] == "PA" and sample.metadata["age_years"] == 60
    assert result.summary()["labels"]["geographic_extent"]["mean"] == 4.5


def test_selection_options(store: Store) -> None:
    task = get_task("findings")
    lateral = s.build_samples(store, task, s.Selection(views=("L",)))
    assert [x.metadata["filename"] for x in lateral.samples] == ["a-lat.png"]
    anything = s.build_samples(store, task, s.Selection(views=("any",), modalities=("any",)))
    assert {x.metadata["filename"] for x in anything.samples} == {
        "a.png",
        "a-lat.png",
        "b.png",
        "ct.png",
        "d.png",
        "e.png",
    }
    both = s.build_samples(store, task, s.Selection(one_per_image=False))
    assert [x.patient for x in both.samples].count("tiny:6") == 1
    bacterial = s.build_samples(store, task, s.Selection(findings=("bacterial",)))
    assert [x.patient for x in bacterial.samples] == ["tiny:2"]
    assert bacterial.excluded[s.FINDING_NOT_SELECTED] >= 1
    scored = s.build_samples(store, task, s.Selection(has_severity=True))
    assert [x.patient for x in scored.samples] == ["tiny:1"]
    other = s.build_samples(store, task, s.Selection(sources=("elsewhere",)))
    assert other.samples == [] and other.excluded[s.SOURCE_NOT_SELECTED] == 9


def test_selection_round_trips_and_rejects_bad_values(store: Store) -> None:
    selection = s.Selection(views=("PA", "AP"), findings=("COVID-19",), has_severity=True)
    assert s.Selection.from_dict(selection.as_dict()) == selection
    with pytest.raises(MetadataError, match="unknown key"):
        s.Selection.from_dict({"colour": "red"})
    task = get_task("findings")
    with pytest.raises(MetadataError, match="view 'sideways'"):
        s.build_samples(store, task, s.Selection(views=("sideways",)))
    with pytest.raises(MetadataError, match="modality 'MRI'"):
        s.build_samples(store, task, s.Selection(modalities=("MRI",)))


def _first_failure(selection: s.Selection, row: dict[str, object], store: Store) -> str | None:
    """The reason a record is left out, found by reading it (the slow way)."""
    with store.read() as conn:
        for reason, step in selection.steps():
            matching = {r["record_id"] for r in queries.list_records(conn, step)}
            if row["record_id"] not in matching:
                return reason
    return None


@pytest.mark.parametrize(
    "selection",
    [
        s.Selection(),
        s.Selection(views=("any",), modalities=("any",), findings=("viral",)),
        s.Selection(views=("PA", "AP"), has_severity=True, sources=("tiny",)),
    ],
)
def test_selection_reads_only_selected_rows_and_counts_the_rest_exactly(
    store: Store, selection: s.Selection, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[int] = []
    iter_records = queries.iter_records

    def counting(*args: Any, **kwargs: Any) -> Any:
        for page in iter_records(*args, **kwargs):
            read.extend(r["record_id"] for r in page)
            yield page

    monkeypatch.setattr(queries, "iter_records", counting)
    result = s.build_samples(store, get_task("findings"), selection)
    with store.read() as conn:
        everything = queries.list_records(conn)
    expected = Counter(_first_failure(selection, row, store) for row in everything)
    kept = expected.pop(None, 0)
    assert len(read) == kept < len(everything)
    counted_in_sql = {k: v for k, v in result.excluded.items() if k in expected}
    assert counted_in_sql == dict(expected)
    assert len(result.samples) + result.excluded.total() == len(everything)


def test_core_imports_without_torch() -> None:
    code = (
        # An import hook that refuses torch, as an environment without it would
        # (sys.modules['torch'] = None would also break scipy's array-API probe).
        "import sys, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError(f'no module named {name!r} (blocked)')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import covidcxr.cli, covidcxr.ingest.writer, covidcxr.ingest.pipeline\n"
        "import covidcxr.dataset.samples, covidcxr.dataset.tasks, covidcxr.export.tables\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_preferred_mask_is_v7_labs_and_says_who_made_it() -> None:
    def mask(annotator: str) -> dict[str, str]:
        return {"kind": "lung_mask", "annotator": annotator, "mask_sha256": f"sha-{annotator}"}

    both = [mask("lungVAE"), mask("v7labs"), {"kind": "severity", "annotator": "x"}]
    assert s._mask(both) == ("v7labs", "sha-v7labs")
    assert s._mask([mask("zeta"), mask("alpha")]) == ("alpha", "sha-alpha")
    assert s._mask([{"kind": "severity", "annotator": "x"}]) is None
