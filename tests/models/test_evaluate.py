"""The evaluation loop with a fake fit on a synthetic store: no leaks, determinism, JSON."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from conftest import encode, upstream_row, write_metadata, xray_like
from covidcxr.cli import evaluate as cli_evaluate
from covidcxr.cli import main
from covidcxr.dataset.samples import SampleSet, Selection, build_samples
from covidcxr.dataset.splits import linked_patients
from covidcxr.dataset.tasks import get_task
from covidcxr.errors import MetadataError
from covidcxr.ingest.pipeline import ingest_source
from covidcxr.models.audit import AuditResult
from covidcxr.models.audit_masks import LungMasks
from covidcxr.models.bundle import load_bundle
from covidcxr.models.eval_pixels import load_pixels
from covidcxr.models.eval_report import EvaluationReport
from covidcxr.models.eval_severity import LITERATURE_SEVERITY, ridge_regressor
from covidcxr.models.evaluate import evaluate as run_evaluation
from covidcxr.models.evaluate import score_labels
from covidcxr.store.db import Store, open_store
from covidcxr.store.duplicates import duplicate_groups

FINDINGS = ("COVID-19", "Streptococcus", "No Finding", "Pneumocystis", "SARS")
LOCATIONS = ("Milan, Italy", "Wuhan, China", "Madrid, Spain")
SHAPE = (96, 80)
# alpha:25's second film is a byte copy of alpha:5's: the two patients are linked.
LINKED = ("alpha:25", "alpha:5")
# Scored patients (alpha:5 among them, so its linked alpha:25 must leave training too).
SCORED = tuple(f"alpha:{p}" for p in (1, 2, 5, 6, 11, 12, 16, 17, 21, 22, 26, 27))


def _lung_mask() -> bytes:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[20:80, 8:36] = 255
    mask[20:80, 44:72] = 255
    return encode(mask)


def _picture(seed: int, finding: str) -> bytes:
    pixels = xray_like(seed, SHAPE).astype(np.int16)
    if finding == "COVID-19":
        pixels[20:80, 8:72] += 40  # brighter lungs: something for a fake model to find
    return encode(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_alpha(root: Path) -> Path:
    """30 patients, every third with a second film; masks and scores for some."""
    rows, images, severity = [], {}, []
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "lungVAE-masks").mkdir(parents=True)
    for patient in range(1, 31):
        finding = FINDINGS[patient % len(FINDINGS)]
        location = LOCATIONS[patient % len(LOCATIONS)]
        films = [f"a{patient}.png"]
        images[films[0]] = _picture(patient, finding)
        if patient % 3 == 0:
            films.append(f"a{patient}-day4.png")
            images[films[1]] = _picture(100 + patient, finding)
        if patient == 25:
            films.append("a25-copy.png")
            images["a25-copy.png"] = images["a5.png"]
        for offset, name in enumerate(films):
            rows.append(
                upstream_row(
                    patientid=str(patient),
                    offset=str(4 * offset),
                    finding=finding,
                    location=location,
                    filename=name,
                )
            )
            if patient % 2 == 0 and name != "a25-copy.png":
                stem = name.rsplit(".", 1)[0]
                (root / "annotations" / "lungVAE-masks" / f"{stem}_mask.png").write_bytes(
                    _lung_mask()
                )
        if f"alpha:{patient}" in SCORED:
            severity.append(f"{films[0]},{patient % 9},{patient % 7}")
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    write_metadata(root / "metadata.csv", rows)
    (root / "annotations" / "covid-severity-scores.csv").write_text(
        "filename,geographic_mean,opacity_mean\n" + "\n".join(severity) + "\n", encoding="utf-8"
    )
    return root


def _write_beta(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for patient in range(1, 9):
        finding = "COVID-19" if patient % 2 else "No Finding"
        name = f"b{patient}.png"
        (root / "images" / name).write_bytes(_picture(700 + patient, finding))
        rows.append(
            upstream_row(
                patientid=str(patient),
                finding=finding,
                location="Hannover, Germany",
                filename=name,
            )
        )
    write_metadata(root / "metadata.csv", rows)
    return root


@dataclass(frozen=True)
class Synthetic:
    database: Path
    data_dir: Path

    def open_copy(self, folder: Path, data_dir: Path | None = None) -> Store:
        copy = folder / "store.sqlite"
        shutil.copyfile(self.database, copy)
        return open_store(f"sqlite:///{copy}", data_dir or self.data_dir, create=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    root = tmp_path_factory.mktemp("evaluate")
    database = root / "store.sqlite"
    with open_store(f"sqlite:///{database}", root / "data", create=True) as store:
        ingest_source(_write_alpha(root / "alpha"), store, workers=1)
        ingest_source(_write_beta(root / "beta"), store, workers=1)
    return Synthetic(database, root / "data")


@pytest.fixture
def store(synthetic: Synthetic, tmp_path: Path) -> Iterator[Store]:
    with synthetic.open_copy(tmp_path) as opened:
        yield opened


# --- a fake fit ------------------------------------------------------------------------


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


@dataclass
class FakeModel:
    """Scores brightness of the lung band; features are quadrant means."""

    seed: int
    input_size: int = 32
    thresholds: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.5)

    def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        assert images.dtype == np.float32
        assert images.shape[1:] == (1, self.input_size, self.input_size)
        assert images.min() >= -1024 and images.max() <= 1024
        band = images[:, 0, 8:24, 4:28].astype(np.float64).mean(axis=(1, 2)) / 300.0
        jitter = (self.seed % 7) * 0.01
        return np.stack([_sigmoid(band + jitter * k) for k in range(5)], axis=1)

    def features(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        half = self.input_size // 2
        quads = [
            images[:, 0, :half, :half],
            images[:, 0, :half, half:],
            images[:, 0, half:, :half],
            images[:, 0, half:, half:],
        ]
        return np.stack([q.astype(np.float64).mean(axis=(1, 2)) for q in quads], axis=1)


@dataclass
class FakeFit:
    """Records every call (the samples and indices it was trained on)."""

    calls: list[tuple[SampleSet, list[int], int]] = field(default_factory=list)
    excluded: list[frozenset[str]] = field(default_factory=list)

    def __call__(
        self,
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> FakeModel:
        self.calls.append((samples, list(train_indices), seed))
        self.excluded.append(exclude_patients)
        return FakeModel(seed)


FAST = {"n_resamples": 50, "severity_splits": 4, "min_heldout_samples": 5}


def _without_created(data: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in data.items() if k != "created"}


# --- tests -----------------------------------------------------------------------------


def test_kfold_never_trains_on_a_test_patient_nor_splits_linked_ones(store: Store) -> None:
    fit = FakeFit()
    report = run_evaluation(
        store,
        fit,
        selection=Selection(sources=("alpha",)),
        folds=3,
        repeats=2,
        schemes=("kfold",),
        severity=False,
        **FAST,
    )
    with store.read() as conn:
        groups = duplicate_groups(conn)
    assert len(fit.calls) == 6
    samples = fit.calls[0][0]
    everyone = set(range(len(samples.samples)))
    linked = linked_patients(samples.patients, groups)
    assert LINKED in linked
    for (_, train, _), excluded in zip(fit.calls, fit.excluded, strict=True):
        train_patients = {samples.samples[i].patient for i in train}
        test_patients = {samples.samples[i].patient for i in everyone - set(train)}
        assert train_patients
        assert not train_patients & test_patients
        assert excluded == test_patients  # fit is told to keep them out of everything
        for group in linked:
            sides = {p in train_patients for p in group}
            assert len(sides) == 1, group
    # every image predicted once per repeat: n per label = known labels
    result = report.schemes["kfold"]
    assert [r.label for r in result.labels] == list(samples.label_names)
    covid = result.labels[0]
    assert covid.n == sum(1 for s in samples.samples if not math.isnan(s.labels[0]))
    assert covid.positives + covid.negatives == covid.n
    assert covid.model["auc"].defined
    assert covid.baseline["auc"].value == 0.5
    assert covid.baseline["brier"].defined
    assert len(result.folds) == 6
    assert result.folds[0].thresholds == (0.5, 0.4, 0.3, 0.2, 0.5)
    assert {f.seed for f in result.folds} == {0, 1, 2, 100, 101, 102}
    assert sum(b.n for b in covid.reliability) == 2 * covid.n


def test_evaluation_is_deterministic_per_seed_and_round_trips(store: Store, tmp_path: Path) -> None:
    options = {"folds": 2, "repeats": 1, "schemes": ("kfold", "source"), **FAST}
    options["n_resamples"] = 100  # the least that gives intervals
    options["lung_masks"] = LungMasks(note="no segmenter in this test")  # reference only
    first = run_evaluation(store, FakeFit(), **options)  # type: ignore[arg-type]
    again = run_evaluation(store, FakeFit(), **options)  # type: ignore[arg-type]
    other = run_evaluation(store, FakeFit(), seed=1, **options)  # type: ignore[arg-type]
    assert _without_created(first.as_dict()) == _without_created(again.as_dict())
    assert _without_created(first.as_dict()) != _without_created(other.as_dict())
    # beta has no lung masks and there is no segmenter: the audit says what it cannot see.
    assert any(
        "no lung masks for source(s) beta (no segmenter in this test)" in line
        for line in first.not_computable
    )
    text = first.to_json()
    assert "NaN" not in text
    back = EvaluationReport.from_dict(json.loads(text))
    assert back.as_dict() == first.as_dict()
    saved = first.save(tmp_path / "report.json")
    assert EvaluationReport.load(saved).as_dict() == first.as_dict()
    card = first.to_card_metrics()
    json.dumps(card, allow_nan=False)
    assert set(card) >= {"evaluation", "findings", "severity", "shortcut_audit", "not_computable"}
    assert card["findings"]["kfold"]["labels"]["COVID-19"]["auc"]["ci95"] is not None


def test_leave_one_source_out_with_two_sources(store: Store) -> None:
    fit = FakeFit()
    report = run_evaluation(store, fit, schemes=("source",), severity=False, **FAST)
    result = report.schemes["source"]
    assert set(result.heldout) == {"alpha", "beta"}
    for samples, train, _ in fit.calls:
        assert len({samples.samples[i].source for i in train}) == 1
    beta = {r.label: r for r in result.heldout["beta"]}
    # beta holds COVID-19 and No Finding only: no bacterial positive -> no AUC, a reason.
    bacterial = beta["Bacterial pneumonia"]
    assert not bacterial.model["auc"].defined
    note = bacterial.model["auc"].note
    assert note is not None
    assert "negative" in note
    assert any("source beta, Bacterial pneumonia" in line for line in report.not_computable)
    assert report.audit is None
    assert any("shortcut audit" in line for line in report.not_computable)


def test_leave_one_source_out_with_one_source_says_so(store: Store) -> None:
    report = run_evaluation(
        store,
        FakeFit(),
        selection=Selection(sources=("alpha",)),
        schemes=("source",),
        severity=False,
        audit=False,
        **FAST,
    )
    result = report.schemes["source"]
    assert not result.computed
    assert result.note is not None
    assert "Only alpha carries this task's labels" in result.note
    assert any(line.startswith("source: not computable") for line in report.not_computable)


def test_leave_one_region_out_skips_small_and_unknown_regions(store: Store) -> None:
    report = run_evaluation(
        store,
        FakeFit(),
        schemes=("region",),
        severity=False,
        audit=False,
        n_resamples=20,
        min_heldout_samples=9,
    )
    result = report.schemes["region"]
    assert set(result.heldout) == {"China", "Italy", "Spain"}
    assert "Germany" in result.skipped
    assert "too few" in result.skipped["Germany"]
    assert {f.test_fold for f in result.folds} == {"China", "Italy", "Spain"}


def test_severity_backbone_never_sees_a_scored_or_linked_patient(store: Store) -> None:
    fit = FakeFit()
    report = run_evaluation(store, fit, schemes=(), audit=False, **FAST)
    assert len(fit.calls) == 1
    samples, train, seed = fit.calls[0]
    assert seed == 900
    scored = build_samples(store, get_task("severity"), Selection(has_severity=True))
    held = set(scored.patients)
    assert held
    assert "alpha:5" in held  # so its linked patient alpha:25 must be held out too
    train_patients = {samples.samples[i].patient for i in train}
    assert not train_patients & (held | {"alpha:25"})
    assert fit.excluded[0] >= held | {"alpha:25"}
    severity = report.severity
    assert severity is not None
    assert severity.n_images == len(scored.samples)
    assert severity.splits == 4
    geographic = severity.targets[0]
    assert geographic.target == "geographic_extent"
    assert geographic.literature["mae"] == LITERATURE_SEVERITY["geographic_extent"]["mae"]
    assert geographic.model["mae"].defined
    assert geographic.baseline["mae"].defined
    assert not geographic.baseline["pearson_r"].defined
    assert "MAE" in geographic.verdict
    assert severity.backbone["held_out_patients"] >= len(held)


def test_audit_covers_the_images_with_masks(store: Store) -> None:
    report = run_evaluation(
        store,
        FakeFit(),
        selection=Selection(sources=("alpha",)),
        folds=2,
        repeats=1,
        schemes=("kfold",),
        severity=False,
        lung_masks=LungMasks(),  # reference masks only
        **FAST,
    )
    audit = report.audit
    assert audit is not None
    samples = build_samples(store, get_task("second-opinion"), Selection(sources=("alpha",)))
    with_mask = sum(1 for s in samples.samples if s.mask_sha256)
    assert audit.n_images == with_mask
    assert audit.n_without_mask == len(samples.samples) - with_mask
    assert [a.label for a in audit.labels] == list(samples.label_names)
    covid = audit.labels[0]
    assert set(covid.auc) == {"full", "no_lungs", "lungs_only"}
    assert audit.verdict


def test_runs_from_the_cache_without_blobs(synthetic: Synthetic, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic.data_dir, data_dir)
    options = {"folds": 2, "repeats": 1, "schemes": ("kfold",), **FAST}
    with synthetic.open_copy(tmp_path, data_dir) as opened:
        first = run_evaluation(opened, FakeFit(), **options)  # type: ignore[arg-type]
    shutil.rmtree(data_dir / "blobs")
    with synthetic.open_copy(tmp_path, data_dir) as opened:
        second = run_evaluation(opened, FakeFit(), **options)  # type: ignore[arg-type]
        samples = build_samples(opened, get_task("second-opinion"))
        with pytest.raises(Exception, match="does not exist"):
            load_pixels(samples, [0], 40, cache_dir=tmp_path / "empty-cache")
    assert _without_created(first.as_dict()) == _without_created(second.as_dict())


def test_argument_errors(store: Store) -> None:
    with pytest.raises(MetadataError, match="unknown scheme"):
        run_evaluation(store, FakeFit(), schemes=("holdout",))
    with pytest.raises(MetadataError, match="regression task"):
        run_evaluation(store, FakeFit(), task="severity")
    with pytest.raises(MetadataError, match="no samples"):
        run_evaluation(store, FakeFit(), selection=Selection(sources=("nowhere",)))
    with pytest.raises(MetadataError, match="format"):
        EvaluationReport.from_dict({"format": "other"})


def test_a_model_with_wrong_outputs_is_refused(store: Store) -> None:
    class Wrong(FakeModel):
        def predict_findings(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
            return np.zeros((len(images), 2))

    def fit(
        samples: SampleSet,
        train_indices: Sequence[int],
        *,
        seed: int,
        exclude_patients: frozenset[str],
    ) -> FakeModel:
        return Wrong(seed)

    with pytest.raises(MetadataError, match="predict_findings gave shape"):
        run_evaluation(store, fit, folds=2, repeats=1, schemes=("kfold",), severity=False)


def test_score_labels_uses_each_models_threshold() -> None:
    labels = np.array([[1.0], [1.0], [0.0], [0.0]])
    probabilities = np.array([[[0.6], [0.6], [0.6], [0.2]]])
    thresholds = np.array([[[0.5], [0.7], [0.7], [0.5]]])
    baseline = np.full((1, 4, 1), 0.5)
    (result,) = score_labels(
        ["x"], labels, probabilities, thresholds, baseline, ["a", "b", "c", "d"], n_resamples=0
    )
    assert result.model["sensitivity"].value == 0.5  # 0.6 >= 0.5; 0.6 < 0.7
    assert result.model["specificity"].value == 1.0  # 0.6 < 0.7; 0.2 < 0.5
    assert result.baseline["brier"].value == 0.25


def test_ridge_regressor_fits_a_linear_signal() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3))
    targets = np.clip(np.stack([features[:, 0] * 2 + 4, features[:, 1] + 3], axis=1), 0, 6)
    fit = ridge_regressor(((0.0, 8.0), (0.0, 6.0)), seed=0)
    predict = fit(features[:30], targets[:30], [str(i) for i in range(30)])
    predicted = predict(features[30:])
    assert predicted.shape == (10, 2)
    assert np.abs(predicted - targets[30:]).mean() < 0.5
    assert predicted.min() >= 0.0


# --- the command line ------------------------------------------------------------------


def _cli_args(synthetic: Synthetic, tmp_path: Path, *extra: str) -> list[str]:
    copy = tmp_path / "cli.sqlite"
    shutil.copyfile(synthetic.database, copy)
    return [
        "evaluate",
        "--db",
        f"sqlite:///{copy}",
        "--data-dir",
        str(synthetic.data_dir),
        *extra,
    ]


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> FakeFit:
    fit = FakeFit()

    def factory(args: argparse.Namespace, store: Store) -> tuple[FakeFit, dict[str, object]]:
        return fit, {"fit": "fake", "size": args.size, "epochs": args.epochs}

    monkeypatch.setattr(cli_evaluate, "make_fit", factory)
    return fit


def test_cli_prints_tables_and_writes_json(
    synthetic: Synthetic,
    tmp_path: Path,
    fake_training: FakeFit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "report.json"
    args = _cli_args(
        synthetic,
        tmp_path,
        "--quick",
        "--resamples",
        "100",
        "--severity-splits",
        "3",
        "--schemes",
        "kfold,source",
        "--min-heldout",
        "5",
        "--out",
        str(out),
    )
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "== kfold: 2-fold cross-validation x 1 repeat(s)" in printed.out
    assert "AUC [95% CI]" in printed.out
    assert "-- held out: beta" in printed.out
    assert "== severity" in printed.out
    assert "literature MAE" in printed.out
    assert "== shortcut audit" in printed.out
    assert "verdict:" in printed.out
    assert "kfold repeat 1/1 fold 1/2" in printed.err
    report = EvaluationReport.load(out)
    assert report.settings["fit"] == "fake"
    assert report.settings["size"] == 64  # from --quick
    assert report.settings["quick"] is True
    assert report.settings["folds"] == 2
    assert len(fake_training.calls) == 2 + 2 + 1


def test_cli_errors_exit_2(
    synthetic: Synthetic,
    tmp_path: Path,
    fake_training: FakeFit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(_cli_args(synthetic, tmp_path, "--update-card")) == 2
    assert "--update-card needs --model" in capsys.readouterr().err
    assert main(_cli_args(synthetic, tmp_path, "--source", "nowhere", "--quick")) == 2
    assert "no samples" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(_cli_args(synthetic, tmp_path, "--schemes", "kfold,holdout"))
    assert exited.value.code == 2
    assert "unknown scheme(s) ['holdout']" in capsys.readouterr().err


def test_cli_fail_on_flag_exits_1(
    synthetic: Synthetic,
    tmp_path: Path,
    fake_training: FakeFit,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flagged = EvaluationReport(
        task={"name": "second-opinion"},
        selection={},
        samples={"samples": 1, "patients": 1, "sources": {}},
        settings={},
        schemes={},
        audit=AuditResult(labels=(), flagged=True, n_images=3),
    )
    monkeypatch.setattr(cli_evaluate, "evaluate", lambda *a, **k: flagged)
    assert main(_cli_args(synthetic, tmp_path)) == 0
    assert main(_cli_args(synthetic, tmp_path, "--fail-on-flag")) == 1
    assert "shortcut audit" in capsys.readouterr().out


def test_cli_update_card_without_renderer_says_so(
    synthetic: Synthetic,
    tmp_path: Path,
    fake_training: FakeFit,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    doc = {
        "format": "covidcxr-model/1",
        "model_id": "fake-model",
        "backbone": {"spec": "small"},
        "input": {"size": 32},
        "findings": {"labels": ["a"], "temperatures": [1.0], "thresholds": [0.5]},
        "severity": {"labels": ["g"], "ranges": [[0, 8]]},
    }
    (bundle / "model.json").write_text(json.dumps(doc), encoding="utf-8")
    empty = EvaluationReport(
        task={"name": "second-opinion"},
        selection={},
        samples={"samples": 1, "patients": 1, "sources": {}},
        settings={},
        schemes={},
    )
    monkeypatch.setattr(cli_evaluate, "evaluate", lambda *a, **k: empty)
    real_import = importlib.import_module

    def no_card(name: str, *args: object) -> object:
        if name == "covidcxr.models.card":
            raise ImportError(name)
        return real_import(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cli_evaluate.importlib, "import_module", no_card)
    code = main(_cli_args(synthetic, tmp_path, "--model", str(bundle), "--update-card"))
    assert code == 2
    assert "needs the card renderer covidcxr.models.card" in capsys.readouterr().err


def test_cli_update_card_writes_model_json_and_card(
    synthetic: Synthetic,
    tmp_path: Path,
    fake_training: FakeFit,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "split.csv").write_text("patient,fold\n", encoding="utf-8")
    split_sha = hashlib.sha256((bundle / "split.csv").read_bytes()).hexdigest()
    doc = {
        "format": "covidcxr-model/1",
        "model_id": "fake-model",
        "backbone": {"spec": "small"},
        "input": {"size": 32},
        "findings": {"labels": ["a"], "temperatures": [1.0], "thresholds": [0.5]},
        "severity": {"labels": ["g"], "ranges": [[0, 8]]},
        "files": {"split.csv": split_sha},
        "metrics": {"from_training": 1},
    }
    (bundle / "model.json").write_text(json.dumps(doc), encoding="utf-8")
    args = _cli_args(
        synthetic,
        tmp_path,
        "--model",
        str(bundle),
        "--update-card",
        "--quick",
        "--schemes",
        "kfold",
        "--skip-severity",
        "--resamples",
        "100",
    )
    assert main(args) == 0
    written = load_bundle(bundle)  # verifies every listed file's hash
    assert written.files["split.csv"] == split_sha
    assert written.metrics["from_training"] == 1
    evaluation = written.metrics["evaluation"]
    assert evaluation["findings"]["kfold"]["labels"]["COVID-19"]["auc"]["value"] is not None
    assert "shortcut_audit" in evaluation
    card = (bundle / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "**Cross-validation**" in card and "| COVID-19 |" in card
    assert "**Shortcut audit**" in card


@pytest.mark.slow
def test_cli_end_to_end_with_the_real_training(
    synthetic: Synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prepare the cache, drop the blobs, then train and evaluate from the cache alone."""
    pytest.importorskip("torch")
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic.data_dir, data_dir)
    database = tmp_path / "e2e.sqlite"
    shutil.copyfile(synthetic.database, database)
    store_options = ["--db", f"sqlite:///{database}", "--data-dir", str(data_dir)]
    prepare = ["evaluate", *store_options, "--source", "alpha", "--size", "32"]
    (data_dir / "cache" / "v2-32-center" / "ab").mkdir(parents=True)  # an older layout
    assert main([*prepare, "--prepare-cache"]) == 0
    printed = capsys.readouterr().out
    assert "cache ready" in printed
    assert "older cache version" in printed and "(v2-32-center)" in printed
    shutil.rmtree(data_dir / "blobs")
    out = tmp_path / "report.json"
    args = [
        "evaluate",
        *store_options,
        "--source",
        "alpha",
        "--size",
        "32",
        "--epochs",
        "1",
        "--folds",
        "2",
        "--repeats",
        "1",
        "--schemes",
        "kfold",
        "--severity-splits",
        "2",
        "--resamples",
        "100",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = EvaluationReport.load(out)
    assert report.settings["fit"] == "covidcxr.models.train.fit_on_indices"
    assert report.settings["train_config"]["size"] == 32
    kfold = report.schemes["kfold"]
    assert len(kfold.folds) == 2
    assert all(len(f.thresholds) == 5 for f in kfold.folds)
    assert kfold.labels[0].model["auc"].defined
    assert report.severity is not None
    assert report.severity.targets[0].model["mae"].defined
    assert report.audit is not None
    assert "== shortcut audit" in capsys.readouterr().out


def test_a_report_written_by_the_previous_version_still_loads() -> None:
    """The hand-written as_dict of the previous version wrote these keys."""
    estimate = {"value": 0.8, "low": 0.7, "high": 0.9, "n": 10, "patients": 8,
                "resamples": 100, "level": 0.95, "note": None}  # fmt: skip
    undefined = {**estimate, "value": None, "low": None, "high": None, "note": "auc: one class"}
    label = {
        "label": "COVID-19", "n": 10, "patients": 8, "positives": 4, "negatives": 6,
        "unknown": 0, "model": {"auc": estimate, "brier": undefined},
        "baseline": {"auc": estimate},
        "reliability": [{"lower": 0.0, "upper": 0.1, "n": 0, "mean_probability": None,
                         "observed_rate": None}],
        "notes": ["auc: one class"],
    }  # fmt: skip
    document = {
        "format": "covidcxr-evaluation/1",
        "intended_use": "research use only",
        "covidcxr_version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "task": {"name": "second-opinion"},
        "selection": {},
        "samples": {"samples": 10, "patients": 8},
        "settings": {"folds": 2},
        "schemes": {
            "kfold": {
                "scheme": "kfold", "description": "2-fold", "note": None, "labels": [label],
                "heldout": {}, "skipped": {},
                "folds": [{"scheme": "kfold", "repeat": 0, "test_fold": "0", "seed": 0,
                           "train_samples": 5, "train_patients": 4, "test_samples": 5,
                           "test_patients": 4, "thresholds": [0.5]}],
            }
        },
        "severity": {
            "protocol": "p", "n_images": 4, "n_patients": 4, "views": {"PA": 4}, "splits": 2,
            "backbone": {"seed": 900}, "reason": None, "literature_source": "Cohen et al.",
            "targets": [{"target": "opacity", "model": {"mae": estimate},
                         "baseline": {"mae": estimate}, "split_sd": {"mae": None},
                         "literature": {"mae": 0.78}, "verdict": "v"}],
        },
        "audit": {
            "flagged": False, "verdict": "not flagged", "n_images": 5, "n_without_mask": 1,
            "method": {"fill": "median"},
            "labels": [{"label": "COVID-19", "auc": {"full": estimate}, "flagged": False,
                        "reason": "r"}],
        },
        "not_computable": ["kfold, COVID-19: auc undefined (one class)"],
    }  # fmt: skip
    report = EvaluationReport.from_dict(json.loads(json.dumps(document)))
    kfold = report.schemes["kfold"]
    assert kfold.labels[0].model["auc"].text() == "0.80 [0.70, 0.90]"
    assert math.isnan(kfold.labels[0].model["brier"].value)
    assert math.isnan(kfold.labels[0].reliability[0].observed_rate)
    assert kfold.folds[0].thresholds == (0.5,)
    assert report.severity is not None
    assert math.isnan(report.severity.targets[0].split_sd["mae"])
    assert report.audit is not None and report.audit.n_without_mask == 1
    written = report.as_dict()
    assert written["audit"]["verdict"] == report.audit.verdict
    assert written["severity"]["literature_source"] == "Cohen et al."
    assert set(written) == set(document)
