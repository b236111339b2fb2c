"""Patient-grouped splits: stratified, deterministic, duplicate-aware, verifiable."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import upstream_row, write_metadata
from covidcxr.dataset import splits
from covidcxr.dataset.regions import region_of
from covidcxr.dataset.samples import Selection, build_samples
from covidcxr.dataset.split_file import SplitMismatchWarning
from covidcxr.dataset.splits import (
    SPANS_SOURCES,
    Split,
    linked_patients,
    load_split,
    make_split,
    verify_split,
)
from covidcxr.dataset.tasks import findings_task, get_task
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.store import queries
from covidcxr.store.db import Store, open_store
from covidcxr.store.duplicates import DuplicateGroup, duplicate_groups
from synthetic_sources import (
    CROSS_SOURCE_PAIR,
    N_POSITIVE,
    NEAR_PAIR,
    Synthetic,
    _picture,
    alpha_rows,
    build_synthetic,
)

COVID = get_task("covid-vs-other-pneumonia")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    """Ingested once per module."""
    return build_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def store(synthetic: Synthetic, tmp_path: Path) -> Iterator[Store]:
    with synthetic.open_copy(tmp_path) as opened:
        yield opened


def covid_split(store: Store, **options: object) -> Split:
    sample_set = build_samples(store, COVID)
    with store.read() as conn:
        return make_split(sample_set, conn, **options)  # type: ignore[arg-type]


# --- the synthetic store is what the tests assume -----------------------------------


def test_synthetic_duplicates_are_the_planted_ones(store: Store) -> None:
    with store.read() as conn:
        groups = duplicate_groups(conn)
    assert sorted(tuple(g.patients) for g in groups) == sorted([CROSS_SOURCE_PAIR, NEAR_PAIR])


# --- regions and groups -------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "region"),
    [
        ("Wuhan, China", "China"),
        ("Barcelona, Spain ", "Spain"),
        ("Italy", "Italy"),
        ("Snohomish County, Washington, USA", "USA"),
        ("Seattle, Washington", "USA"),
        ("NIH Clinical Center, Bethesda, MD, USA", "USA"),
        ("Boca Raton, Florida , USA", "USA"),
        ("Edinburgh, United Kingdom", "United Kingdom"),
        ("London, England", "United Kingdom"),
        ("Hong Kong", "China"),
        ("Prince of Wales Hospital, Chinese University of Hong Kong, China", "China"),
        ("Taoyuan General Hospital, Taoyuan, Taiwan", "Taiwan"),
        ("Ospedale Santo Spirito. Rome, Italy", "Italy"),
        ("Guatemala, Guatemala", "Guatemala"),
        ("", "unknown"),
        ("?", "unknown"),
        (None, "unknown"),
    ],
)
def test_region_of(location: str | None, region: str) -> None:
    assert region_of(location) == region


def _group(*patients: str) -> DuplicateGroup:
    records = tuple(
        {"source": p.split(":")[0], "patient_id": p.split(":")[1], "image_sha256": "0" * 64}
        for p in patients
    )
    return DuplicateGroup("near", 4, records)


def test_linked_patients_joins_through_patients_outside_the_selection() -> None:
    groups = [_group("s:1", "s:9"), _group("s:9", "s:3"), _group("s:4", "s:5")]
    assert linked_patients(["s:3", "s:2", "s:1", "s:4"], groups) == [
        ("s:1", "s:3"),
        ("s:2",),
        ("s:4",),
    ]


# --- k-fold and holdout -------------------------------------------------------------


def test_kfold_puts_every_patient_in_one_fold_and_spreads_positives(store: Store) -> None:
    # PA films of alpha: 60 patients, 20 of them positive, one film each.
    sample_set = build_samples(store, COVID, Selection(views=("PA",), sources=("alpha",)))
    with store.read() as conn:
        split = make_split(sample_set, conn, folds=5, seed=0)
    assert split.folds == ("0", "1", "2", "3", "4")
    assert set(split.assignment) == set(sample_set.patients)
    assert sum(1 for s in sample_set.samples if s.labels[0] == 1.0) == N_POSITIVE
    indices = [split.indices(sample_set, fold) for fold in split.folds]
    assert sorted(i for fold in indices for i in fold) == list(range(len(sample_set.samples)))
    for fold, members in zip(split.folds, indices, strict=True):
        assert members == sorted(members)
        assert {sample_set.samples[i].patient for i in members} == set(split.patients_in(fold))
        positives = sum(1 for i in members if sample_set.samples[i].labels[0] == 1.0)
        assert positives >= 3, (fold, positives)
        assert 11 <= len(members) <= 13
    table = split.fold_table(sample_set)
    assert [row["samples"] for row in table] == [len(m) for m in indices]
    assert sum(row["positive Pneumonia/Viral/COVID-19"] for row in table) == N_POSITIVE
    assert split.cross_validation()[0] == (("1", "2", "3", "4"), "0")


def test_samples_come_in_store_order(store: Store) -> None:
    sample_set = build_samples(store, COVID)
    with store.read() as conn:
        order = [r["record_id"] for r in queries.list_records(conn)]
    ids = [s.record_id for s in sample_set.samples]
    assert ids == [i for i in order if i in set(ids)]


@pytest.mark.parametrize("seed", range(6))
def test_near_duplicates_across_patients_share_a_fold(store: Store, seed: int) -> None:
    split = covid_split(store, seed=seed)
    assert split.fold_of(NEAR_PAIR[0]) == split.fold_of(NEAR_PAIR[1])
    assert split.fold_of(CROSS_SOURCE_PAIR[0]) == split.fold_of(CROSS_SOURCE_PAIR[1])


def test_same_seed_same_file_other_seed_other_split(store: Store, tmp_path: Path) -> None:
    first = covid_split(store, seed=7).save(tmp_path / "first.csv")
    second = covid_split(store, seed=7).save(tmp_path / "second.csv")
    other = covid_split(store, seed=8).save(tmp_path / "other.csv")

    def body(path: Path) -> list[str]:
        return [x for x in path.read_text().splitlines() if not x.startswith("# created:")]

    assert body(first) == body(second)
    assert [x for x in body(first) if not x.startswith("#")] != [
        x for x in body(other) if not x.startswith("#")
    ]
    lines = first.read_text().splitlines()
    assert lines[0] == '# format: "covidcxr-split/1"'
    assert "# seed: 7" in lines
    assert lines[lines.index("patient,fold") + 1 :] == sorted(
        lines[lines.index("patient,fold") + 1 :]
    )


def test_holdout_fractions(store: Store) -> None:
    sample_set = build_samples(store, COVID)
    with store.read() as conn:
        split = make_split(sample_set, conn, scheme="holdout", fractions=(0.6, 0.2, 0.2), seed=3)
        sizes = {fold: len(split.indices(sample_set, fold)) for fold in split.folds}
        assert split.folds == ("train", "val", "test")
        assert split.fractions == (0.6, 0.2, 0.2)
        total = len(sample_set.samples)
        assert abs(sizes["train"] - 0.6 * total) <= 3 and abs(sizes["test"] - 0.2 * total) <= 3
        with pytest.raises(MetadataError, match="sum to 1"):
            make_split(sample_set, conn, scheme="holdout", fractions=(0.5, 0.2, 0.2))
        with pytest.raises(MetadataError, match="three"):
            make_split(sample_set, conn, scheme="holdout", fractions=(0.5, 0.5))
        with pytest.raises(MetadataError, match="at least 2"):
            make_split(sample_set, conn, folds=1)
        with pytest.raises(MetadataError, match="cannot fill 99 folds"):
            make_split(sample_set, conn, folds=99)
    with pytest.raises(MetadataError, match="no rounds"):
        split.cross_validation()


def test_regression_task_stratifies_on_binned_target(store: Store) -> None:
    task = get_task("severity")
    sample_set = build_samples(store, task, Selection(has_severity=True))
    with store.read() as conn:
        split = make_split(sample_set, conn, folds=3, seed=0)
    table = split.fold_table(sample_set)
    assert set(table[0]) == {
        "fold",
        "patients",
        "samples",
        "mean geographic_extent",
        "mean opacity",
    }
    means = [row["mean geographic_extent"] for row in table]
    assert max(means) - min(means) < 1.0


# --- files --------------------------------------------------------------------------


def test_save_and_load_round_trip(store: Store, tmp_path: Path) -> None:
    split = covid_split(store, scheme="holdout")
    loaded = load_split(split.save(tmp_path / "split.csv"))
    assert loaded == split
    assert loaded.fold_of("alpha:1") == split.assignment["alpha:1"]
    with pytest.raises(MetadataError, match="not in this split"):
        loaded.fold_of("alpha:999")
    with pytest.raises(MetadataError, match="unknown fold"):
        loaded.patients_in("nope")
    with pytest.raises(IsADirectoryError):
        split.save(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("alpha:1,", "alpha:1,x", 1), "is not one of"),
        (lambda t: t.replace("\nalpha:10,", "\nalpha:1,", 1), "again \\(first on line"),
        (lambda t: t.replace("patient,fold", "patient;fold"), "header"),
        (lambda t: t.replace("# seed: 0", "# sead: 0"), "unknown key 'sead'"),
        (lambda t: t.replace("# seed: 0", "# seed: zero"), "not JSON"),
        (lambda t: t.replace("# seed: 0\n", ""), "missing comment key\\(s\\) seed"),
        (lambda t: t.replace("# seed: 0", "# seed: 1"), "was edited"),
        (lambda t: t + "alpha:999,train\n", "was edited"),
        (lambda t: t + "\n", "is not 'patient,fold'"),
        (lambda t: t.replace("# scheme", "#scheme"), "not '# key: value'"),
    ],
)
def test_load_refuses_edited_or_malformed_files(
    store: Store, tmp_path: Path, edit: object, message: str
) -> None:
    path = covid_split(store, scheme="holdout").save(tmp_path / "split.csv")
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    with pytest.raises(MetadataError, match=rf"split file .*split\.csv:(\d+:)? .*{message}"):
        load_split(path)


def test_a_changed_row_is_refused_with_its_line(store: Store, tmp_path: Path) -> None:
    path = covid_split(store).save(tmp_path / "split.csv")
    lines = path.read_text().splitlines()
    row = next(i for i, x in enumerate(lines) if x.startswith("alpha:1,"))
    fold = lines[row].split(",")[1]
    lines[row] = f"alpha:1,{'1' if fold == '0' else '0'}"
    path.write_text("\n".join(lines) + "\n")
    hash_line = next(i for i, x in enumerate(lines) if x.startswith("# content_sha256")) + 1
    with pytest.raises(MetadataError, match=f"split.csv:{hash_line}: content_sha256 does not"):
        load_split(path)


# --- verify -------------------------------------------------------------------------


def test_fresh_split_verifies(store: Store, tmp_path: Path) -> None:
    split = load_split(covid_split(store).save(tmp_path / "split.csv"))
    assert verify_split(store, split) == []


def test_split_made_without_duplicates_leaks_and_fails_verify(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def all_but_the_near_pair(conn: object, max_distance: int | None = None) -> list[object]:
        return [g for g in duplicate_groups(conn) if tuple(g.patients) != NEAR_PAIR]  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(splits, "duplicate_groups", all_but_the_near_pair)
        for seed in range(30):
            split = covid_split(store, seed=seed)
            if split.fold_of(NEAR_PAIR[0]) != split.fold_of(NEAR_PAIR[1]):
                break
        else:  # pragma: no cover - 30 seeds, 1/5 chance each to stay together
            pytest.fail("no seed separated the pair")
    # The leaking file is well-formed: only verify can tell.
    loaded = load_split(split.save(tmp_path / "leaky.csv"))
    problems = verify_split(store, loaded)
    assert [p.code for p in problems] == ["leak"]
    assert problems[0].patients == NEAR_PAIR
    assert "sit in different folds" in str(problems[0])


def test_moving_one_of_a_pair_fails_verify(store: Store, tmp_path: Path) -> None:
    split = covid_split(store)
    patient = NEAR_PAIR[0]
    moved = next(f for f in split.folds if f != split.assignment[patient])
    edited = dataclasses.replace(split, assignment={**split.assignment, patient: moved})
    problems = verify_split(store, load_split(edited.save(tmp_path / "edited.csv")))
    assert [p.code for p in problems] == ["leak", "membership_changed"]


def test_store_changes_fail_verify(synthetic: Synthetic, tmp_path: Path) -> None:
    with synthetic.open_copy(tmp_path) as store:
        split = covid_split(store)
        # One more row (a new patient) in the source, ingested again.
        changed = tmp_path / "alpha"
        shutil.copytree(synthetic.alpha, changed)
        rows, _, _ = alpha_rows()
        rows.append(upstream_row(patientid="61", filename="a61.png", location="Italy"))
        (changed / "images" / "a61.png").write_bytes(_picture(61))
        write_metadata(changed / "metadata.csv", rows)
        ingest_source(changed, store, name="alpha", workers=1)
        problems = verify_split(store, split)
        # (membership_sha256 covers the patients of the file, whose images are unchanged)
        assert [p.code for p in problems] == ["missing"]
        assert problems[0].patients == ("alpha:61",)
        # The same patients, one of them with another picture.
        (changed / "images" / "a1.png").write_bytes(_picture(4242))
        ingest_source(changed, store, name="alpha", workers=1)
        problems = verify_split(store, split)
        assert "membership_changed" in [p.code for p in problems]
        remade = covid_split(store)
        (changed / "metadata.csv").write_text(
            (changed / "metadata.csv").read_text().replace("a2.png", "missing.png")
        )
        ingest_source(changed, store, name="alpha", workers=1)
        problems = verify_split(store, remade)
    assert [p.code for p in problems] == ["not_selected", "membership_changed"]
    assert problems[0].patients == ("alpha:2",)


def test_custom_findings_task_is_rebuilt_for_verify(store: Store) -> None:
    task = findings_task(["COVID-19", "Pneumonia/Bacterial"])
    sample_set = build_samples(store, task)
    with store.read() as conn:
        split = make_split(sample_set, conn, folds=3)
    assert split.task["name"] == "findings-custom"
    assert verify_split(store, split) == []


# --- leave-one-source-out and leave-one-region-out ----------------------------------


def test_leave_one_source_out_excludes_groups_spanning_sources(store: Store) -> None:
    split = covid_split(store, scheme="source")
    assert split.folds == ("alpha", "beta")
    assert split.excluded == {SPANS_SOURCES: CROSS_SOURCE_PAIR}
    assert split.excluded_counts == {SPANS_SOURCES: 2}
    assert all(p.split(":")[0] == fold for p, fold in split.assignment.items())
    assert split.cross_validation() == [(("beta",), "alpha"), (("alpha",), "beta")]
    with pytest.raises(MetadataError, match="is in no fold: duplicate images link it"):
        split.fold_of("beta:3")
    assert verify_split(store, split) == []
    sample_set = build_samples(store, COVID)
    kept = split.indices(sample_set, split.folds)
    assert {sample_set.samples[i].patient for i in kept} == set(split.assignment)
    # A patient put back into a fold cannot be placed.
    forced = dataclasses.replace(
        split, assignment={**split.assignment, "beta:3": "beta"}, excluded={}
    )
    assert "cannot_place" in [p.code for p in verify_split(store, forced)]


def test_leave_one_region_out(store: Store) -> None:
    split = covid_split(store, scheme="region")
    assert split.folds == ("China", "Germany", "Italy", "Spain", "USA", "unknown")
    sample_set = build_samples(store, COVID)
    for sample in sample_set.samples:
        if sample.patient in split.assignment:
            assert split.fold_of(sample.patient) == region_of(sample.metadata["location"])
    # alpha:7 (Seattle, USA) shares a picture with beta:3 (Germany): neither can be placed.
    assert split.excluded_counts == {splits.SPANS_REGIONS: 2}
    assert verify_split(store, split) == []
    moved = dataclasses.replace(split, assignment={**split.assignment, "alpha:2": "Italy"})
    assert [p.code for p in verify_split(store, moved)] == ["wrong_fold", "membership_changed"]


def test_leave_one_out_needs_two_folds(store: Store) -> None:
    sample_set = build_samples(store, COVID, Selection(sources=("alpha",)))
    with store.read() as conn, pytest.raises(MetadataError, match="at least two sources"):
        make_split(sample_set, conn, scheme="source")


def test_no_samples_is_an_error(store: Store) -> None:
    sample_set = build_samples(store, COVID, Selection(sources=("nowhere",)))
    with store.read() as conn, pytest.raises(MetadataError, match="has no samples"):
        make_split(sample_set, conn)


def test_samples_of_another_selection_warn_with_counts(store: Store) -> None:
    split = covid_split(store)
    narrower = build_samples(store, COVID, Selection(views=("PA",)))
    with pytest.warns(SplitMismatchWarning, match=r"views .* of the split's \d+ patients"):
        chosen = split.indices(narrower, split.folds[0])
    assert len(narrower) == len(narrower.samples) > 0
    assert all(split.fold_of(narrower.samples[i].patient) == split.folds[0] for i in chosen)


def test_samples_of_the_split_selection_do_not_warn(store: Store) -> None:
    split = covid_split(store)
    same = build_samples(store, COVID, Selection.from_dict(split.selection))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(split.indices(same, split.folds)) == len(same)


def test_counts_by_fold_cover_the_sample_set(store: Store) -> None:
    sample_set = build_samples(store, COVID)
    split = covid_split(store, scheme="region")
    counted = Counter(split.assignment.get(s.patient, "excluded") for s in sample_set.samples)
    table = split.fold_table(sample_set)
    assert {row["fold"]: row["samples"] for row in table} == {
        k: v for k, v in counted.items() if k != "excluded"
    }


# --- the real collection ------------------------------------------------------------

KNOWN_PAIRS = [("285", "339"), ("287", "340"), ("97", "178"), ("192", "196"), ("78", "201")]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The real collection and the NIH subset, ingested once per module."""
    from conftest import COVID_DIR, NIH_DIR

    if not (COVID_DIR / "metadata.csv").is_file() or not (NIH_DIR / "metadata.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR.parent}")
    from covidcxr.ingest.mapping import load_mapping

    mapping = Path(__file__).resolve().parents[2] / "examples/mappings/nih-cxr14-subset.toml"
    folder = tmp_path_factory.mktemp("real")
    with open_store(f"sqlite:///{folder / 'real.sqlite'}", folder / "data", create=True) as store:
        ingest_source(COVID_DIR, store)
        ingest_source(NIH_DIR, store, mapping=load_mapping(mapping))
        yield store


def _pairs_in_one_fold(split: Split) -> list[tuple[str, str]]:
    """The known pairs with both patients in the split; asserts they share a fold."""
    present = []
    for first, second in KNOWN_PAIRS:
        a, b = f"covid-chestxray:{first}", f"covid-chestxray:{second}"
        if a in split.assignment and b in split.assignment:
            assert split.fold_of(a) == split.fold_of(b), (a, b)
            present.append((first, second))
    return present


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_kfold_keeps_cross_patient_duplicates_together(real_store: Store) -> None:
    sample_set = build_samples(real_store, COVID)
    with real_store.read() as conn:
        split = make_split(sample_set, conn, folds=5, seed=0)
    assert (len(sample_set.samples), len(split.assignment)) == (494, 294)
    # 285/339 are "Pneumonia" (too unspecific for this task); 340's films are 287's
    # files (kept once): the near pairs remain.
    assert _pairs_in_one_fold(split) == [("97", "178"), ("192", "196"), ("78", "201")]
    positives = [row["positive Pneumonia/Viral/COVID-19"] for row in split.fold_table(sample_set)]
    assert max(positives) - min(positives) <= 2
    assert verify_split(real_store, split) == []
    # Every film of every view and modality, shared files kept under both patients:
    # all five pairs are in the split, each in one fold.
    everything = Selection(
        views=("any",), modalities=("any",), sources=("covid-chestxray",), one_per_image=False
    )
    sample_set = build_samples(real_store, get_task("findings"), everything)
    with real_store.read() as conn:
        for seed in range(3):
            split = make_split(sample_set, conn, folds=5, seed=seed)
            assert _pairs_in_one_fold(split) == KNOWN_PAIRS
    assert verify_split(real_store, split) == []


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_leave_one_source_out(real_store: Store) -> None:
    sample_set = build_samples(real_store, get_task("findings"))
    with real_store.read() as conn:
        split = make_split(sample_set, conn, scheme="source")
    assert split.folds == ("covid-chestxray", "nih-cxr14-subset")
    assert split.excluded == {}
    sizes = {row["fold"]: row["samples"] for row in split.fold_table(sample_set)}
    assert sizes == {"covid-chestxray": 527, "nih-cxr14-subset": 999}
    assert verify_split(real_store, split) == []


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_leave_one_region_out(real_store: Store) -> None:
    sample_set = build_samples(real_store, COVID)
    with real_store.read() as conn:
        split = make_split(sample_set, conn, scheme="region")
    assert {"China", "Italy", "Germany", "Spain", "USA", "United Kingdom", "unknown"} <= set(
        split.folds
    )
    assert "Hong Kong" not in split.folds and split.folds[-1] == "unknown"
    # Patient 197's two films come from case reports in Pamplona and Milan.
    assert split.excluded == {splits.SPANS_REGIONS: ("covid-chestxray:197",)}
    assert len(split.assignment) == 293
    assert verify_split(real_store, split) == []
