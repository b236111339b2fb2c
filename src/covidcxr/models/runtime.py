"""Prediction without torch: inputs, preprocessing, the gate, outputs, and onnxruntime.

This module holds everything a prediction needs except the network itself, so that the
torch path (:class:`covidcxr.models.predict.Predictor`) and the CPU path here
(:class:`OnnxPredictor`, onnxruntime only) give the same rows from the same code:

1. **Inputs.** Files are decoded with :func:`covidcxr.imaging.decode.read_image_file`
   (content sniffing, pixel limit, truncation checks); a directory stands for every
   file under it (hidden ones skipped), and files that are not PNG or JPEG get a row
   saying so instead of stopping the run.
2. **Gate rules** (:mod:`covidcxr.models.gate`): decodable, size, greyscale.
3. **Preprocessing** exactly as training (:func:`covidcxr.dataset.loading.load_image`):
   JPEG files go through ``load_image`` itself (training decoded JPEGs at a reduced DCT
   scale, which only libjpeg reproduces); PNG files and in-memory images get the same
   operations on the decoded image (grey conversion, centre-square box, one antialiased
   resize), bit-identical to ``load_image`` (tested). Then
   :func:`~covidcxr.dataset.loading.normalise` to [-1024, 1024].
4. **One forward pass** per batch gives the gate head, findings, severity and feature
   map. The gate head decides the ``frontal_view`` check; images failing any check get
   a row with the verdict and reason and no findings.
5. **Outputs.** Calibrated probabilities ``sigmoid(logit / T)`` with the bundle's
   temperatures; positive findings at the bundle's thresholds, for the labels whose
   threshold rests on enough validation images (the others: probability, no call);
   severity means clipped
   to their ranges with the bundle's interval (a fixed half width per output, or, when
   the bundle gives none, the Gaussian interval at its ``level`` from the predicted
   log-variance); heatmaps (:mod:`covidcxr.models.saliency`) for every positive
   finding, or the most probable one when none is positive.
6. **Provenance** on every row: model id, weights sha256, engine, the checks passed and
   failed, and "research use only, not a diagnosis".

The ONNX contract (what :class:`OnnxPredictor` needs from ``model.onnx``): one input
``(batch, 1, size, size)`` float32 with a dynamic batch; outputs named ``features``,
``findings``, ``severity`` and ``gate`` (``pooled`` may be there too), or exactly the
five outputs of :meth:`CXRModel.forward <covidcxr.models.network.CXRModel.forward>` in
its order (features, pooled, findings, severity, gate) when unnamed; weights stored in
the file itself (``external_data=False``: the bundle hashes ``model.onnx`` only). CAM
heatmaps need the findings head's weight matrix: it is read once from the ONNX file's
initializer ``heads.findings.weight`` (or ``<prefix>.heads.findings.weight``, as a
wrapper exports it), with the ``onnx`` package, on the first heatmap,
so the file stays the single source of the network and nothing else has to be shipped.

Nothing in this module's import chain imports torch (a test runs it with torch
blocked). Steps 1 and 3 live in :mod:`covidcxr.models.inputs`, the row types and
step 5's arithmetic in :mod:`covidcxr.models.rows`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from covidcxr.dataset import loading
from covidcxr.errors import ImageError, MetadataError, MissingExtraError
from covidcxr.imaging.decode import read_image_file, sniff_format
from covidcxr.models import abnormality, coherence, gate, lung_gate, processing, saliency
from covidcxr.models.bundle import ModelBundle
from covidcxr.models.inputs import (
    as_image,
    expand_inputs,
    grey_levels,
    not_a_regular_file,
    preprocess,
)
from covidcxr.models.lungs import Backend, found_two_lungs
from covidcxr.models.rows import (
    NetworkOutputs,
    SeverityScore,
    calibrated_probabilities,
    check_bundle,
    severity_scores,
    summarise_row,
)
from covidcxr.models.rows import (
    PredictionRow as PredictionRow,  # re-exported: imported from here in several places
)

logger = logging.getLogger(__name__)

#: The crop every bundle's input uses (``model.json``: ``input.crop``).
CROP: Final = "center"
#: Default number of images per forward pass.
DEFAULT_BATCH_SIZE: Final = 16
#: Name of the findings head's weight matrix in exported networks.
FINDINGS_WEIGHT: Final = "heads.findings.weight"

_DECODABLE: Final = frozenset({"PNG", "JPEG", "DICOM"})
_UNSAFE_NAME: Final = re.compile(r"[^A-Za-z0-9._-]+")
_FORWARD_OUTPUTS: Final = ("features", "pooled", "findings", "severity", "gate")


def _safe_stem(name: str) -> str:
    stem = Path(name).stem if name else "image"
    return _UNSAFE_NAME.sub("_", stem).strip("._") or "image"


# --------------------------------------------------------------------------- engines


def load_pneumonia_model(
    bundle: ModelBundle, gate_model: lung_gate.LungGate | None
) -> abnormality.PneumoniaModel | None:
    """The lung-zone pneumonia model a bundle names (``"abnormality": {"file": ...}``),
    sharing the lung gate's segmenter; ``None`` when it names none.

    Raises:
        MissingExtraError: neither torch nor onnxruntime runs the lung segmenter.
        MetadataError: the file is missing or not a pneumonia model.
    """
    spec = bundle.extra.get("abnormality")
    if not spec:
        return None
    segmenter = gate_model.segmenter if gate_model is not None else None
    return abnormality.PneumoniaModel.load(bundle.path / str(spec["file"]), segmenter)


def load_lung_gate(bundle: ModelBundle, backend: Backend = "auto") -> lung_gate.LungGate | None:
    """The lung gate a bundle names in ``model.json`` (``"lung_gate": {"gate_id": ...}``),
    or ``None`` when it names none; then the network's gate head decides.

    Raises:
        MetadataError: the named gate is missing or damaged.
        MissingExtraError: neither torch nor onnxruntime runs the lung segmenter.
    """
    spec = bundle.extra.get("lung_gate")
    if not spec:
        return None
    gate_id = str(spec.get("gate_id", ""))
    if not gate_id or "/" in gate_id or "\\" in gate_id or gate_id.startswith("."):
        raise MetadataError(f"predict: model {bundle.model_id} names a bad lung gate {gate_id!r}")
    return lung_gate.LungGate.load(lung_gate.WEIGHTS_DIR.parent / gate_id, backend)


@dataclass
class _Item:
    """One input on its way through a batch."""

    name: str
    sha256: str | None
    image: Image.Image | None
    verdict: gate.GateVerdict
    pixels: NDArray[np.uint8] | None = None
    lungs: NDArray[np.float32] | None = None  # the lung gate's segmentation, reused


@dataclass
class _HeatmapRequest:
    """Where heatmaps go, and names already used (two inputs may share a stem)."""

    directory: Path | None
    keep_in_memory: bool
    raw_maps: bool
    used_names: set[str] = field(default_factory=set)

    def unique_stem(self, name: str, sha256: str | None) -> str:
        stem = _safe_stem(name)
        if stem in self.used_names:
            suffix = sha256[:8] if sha256 else str(len(self.used_names))
            stem = f"{stem}-{suffix}"
            while stem in self.used_names:
                stem += "_"
        self.used_names.add(stem)
        return stem


class InferenceEngine(ABC):
    """What every prediction engine shares; subclasses supply the forward pass.

    Attributes:
        bundle: the model.
        engine: the engine's name (``torch``, ``onnx``).
    """

    engine: ClassVar[str] = ""

    def __init__(self, bundle: ModelBundle) -> None:
        check_bundle(bundle)
        self.bundle = bundle
        # The lung segmenter runs where the network does (an ONNX engine never imports torch).
        self.lung_gate = load_lung_gate(bundle, "onnx" if self.engine == "onnx" else "auto")
        self.pneumonia = load_pneumonia_model(bundle, self.lung_gate)

    @abstractmethod
    def forward(self, batch: NDArray[np.float32]) -> NetworkOutputs:
        """Run the network on ``(B, 1, size, size)`` inputs in [-1024, 1024]."""

    @abstractmethod
    def findings_weights(self) -> NDArray[np.float32]:
        """The findings head's ``(K, C)`` weight matrix (for CAM)."""

    def explain(
        self, batch: NDArray[np.float32], outputs: NetworkOutputs, targets: Sequence[int]
    ) -> NDArray[np.float32]:
        """Raw ``(B, h, w)`` maps, one per image for its target finding (CAM here)."""
        weights = self.findings_weights()[np.asarray(targets, dtype=np.intp)]
        maps = np.einsum("bc,bchw->bhw", weights, outputs.features)
        result: NDArray[np.float32] = maps.astype(np.float32, copy=False)
        return result

    # ----------------------------------------------------------------- public API

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        heatmaps_dir: str | os.PathLike[str] | None = None,
        raw_maps: bool = False,
        heatmaps: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> list[PredictionRow]:
        """Predict on files and directories (see :func:`expand_inputs`).

        Args:
            paths: image files and folders.
            heatmaps_dir: write an overlay PNG per explained finding here
                (``<stem>.<label>.png``; a second file with the same stem gets
                ``<stem>-<sha256[:8]>``).
            raw_maps: also write each raw map as ``<stem>.<label>.npy``.
            heatmaps: keep each explained finding's [0, 1] map on the whole image in
                :attr:`PredictionRow.heatmaps` (full resolution: mind the memory).
            batch_size: images per forward pass (also the most decoded images held in
                memory at once).
            progress: called with the number of files done after each batch.

        Returns:
            One row per file, in input order; files that are unreadable, not PNG or
            JPEG, or fail the gate get a row with the verdict and reason.

        Raises:
            MetadataError: a given path does not exist.
        """
        files = expand_inputs(paths)
        request = self._request(heatmaps_dir, keep=heatmaps, raw_maps=raw_maps)
        rows: list[PredictionRow] = []
        for start in range(0, len(files), _check_batch_size(batch_size)):
            items = [self._load_file(path) for path in files[start : start + batch_size]]
            rows.extend(self._run(items, request))
            if progress is not None:
                progress(len(items))
        return rows

    def predict_arrays(
        self,
        images: Sequence[Image.Image | NDArray[Any]],
        *,
        names: Sequence[str] | None = None,
        heatmaps: bool = False,
        heatmaps_dir: str | os.PathLike[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[PredictionRow]:
        """Predict on decoded images (arrays as :func:`as_image` takes, or Pillow).

        Args:
            images: the images.
            names: a name per image for the rows (default ``image[i]``).
            heatmaps: keep each explained finding's [0, 1] map on the whole image in
                :attr:`PredictionRow.heatmaps`.
            heatmaps_dir: also write overlay PNGs there.
            batch_size: images per forward pass.

        Returns:
            One row per image, in order.
        """
        if names is not None and len(names) != len(images):
            raise ValueError(f"predict_arrays: {len(images)} images but {len(names)} names")
        labels = list(names) if names is not None else [f"image[{i}]" for i in range(len(images))]
        request = self._request(heatmaps_dir, keep=heatmaps, raw_maps=False)
        rows: list[PredictionRow] = []
        for start in range(0, len(images), _check_batch_size(batch_size)):
            items = [
                self._load_array(labels[i], images[i])
                for i in range(start, min(start + batch_size, len(images)))
            ]
            rows.extend(self._run(items, request))
        return rows

    # ----------------------------------------------------------------- pipeline

    def _request(
        self, directory: str | os.PathLike[str] | None, *, keep: bool, raw_maps: bool
    ) -> _HeatmapRequest | None:
        if directory is None and not keep:
            return None
        folder = None if directory is None else Path(directory).expanduser()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        return _HeatmapRequest(folder, keep, raw_maps)

    def _load_file(self, path: Path) -> _Item:
        """One file's item; any failure, running out of memory included, is its row."""
        try:
            return self._read_file(path)
        except MemoryError:
            error = ImageError(
                f"predict: {str(path)!r} needs more memory to decode than this machine has",
                code="too_many_pixels",
            )
            return _Item(str(path), None, None, gate.decode_failure(error))

    def _read_file(self, path: Path) -> _Item:
        name = str(path)
        problem = not_a_regular_file(path)
        if problem is not None:
            error = ImageError(f"predict: {name!r} {problem}", code="unreadable")
            return _Item(name, None, None, gate.decode_failure(error))
        try:
            with path.open("rb") as handle:
                head = handle.read(512)
        except OSError:
            head = None  # read_image_file below names the problem
        kind = None if head is None else sniff_format(head)
        if head and kind not in _DECODABLE:
            # Refused before reading the rest: a folder may hold large non-image files.
            what = f"{kind} bytes" if kind else "unrecognised bytes"
            error = ImageError(
                f"predict: {name!r} holds {what}, not a PNG or JPEG image",
                code="unsupported_format",
            )
            return _Item(name, None, None, gate.decode_failure(error))
        if kind == "DICOM":
            return self._read_dicom(path)
        try:
            data, decoded = read_image_file(path)
        except ImageError as exc:
            return _Item(name, None, None, gate.decode_failure(exc))
        sha256 = hashlib.sha256(data).hexdigest()
        image = decoded.image
        verdict = gate.check_rules(image, self.bundle.gate)
        item = _Item(name, sha256, image, verdict)
        if verdict.passed:
            size = self.bundle.input_size
            if decoded.info.format == "JPEG":
                try:
                    item.pixels = loading.load_image(path, size, crop=CROP)
                except ImageError as exc:  # changed on disk since it was read
                    item.verdict = gate.decode_failure(exc)
            else:
                item.pixels = preprocess(image, size)
        return item

    def _read_dicom(self, path: Path) -> _Item:
        """A DICOM file's item: its displayed grey levels; nothing from its header is kept
        or shown (the row names the path as given)."""
        name = str(path)
        try:
            from covidcxr.imaging import dicom  # the dicom extra, only when a DICOM comes

            data, decoded = dicom.read_dicom_file(path)
        except MissingExtraError as exc:
            error = ImageError(f"predict: {name!r} is DICOM: {exc}", code="unsupported_format")
            return _Item(name, None, None, gate.decode_failure(error))
        except ImageError as exc:
            return _Item(name, None, None, gate.decode_failure(exc))
        if decoded.metadata.burned_in_annotation:
            logger.warning(
                "predict: %r declares burned-in annotation: its pixels, and heatmap overlays "
                "of it, may show patient identity",
                name,
            )
        image = decoded.image
        verdict = gate.check_rules(image, self.bundle.gate)
        pixels = preprocess(image, self.bundle.input_size) if verdict.passed else None
        return _Item(name, hashlib.sha256(data).hexdigest(), image, verdict, pixels)

    def _load_array(self, name: str, array: Image.Image | NDArray[Any]) -> _Item:
        image = as_image(array)
        verdict = gate.check_rules(image, self.bundle.gate)
        pixels = preprocess(image, self.bundle.input_size) if verdict.passed else None
        return _Item(name, None, image, verdict, pixels)

    def _lung_gate_verdicts(self, items: list[_Item]) -> None:
        """Decide the ``frontal_view`` check with the bundle's lung gate, and with its
        pneumonia model the ``grey_levels`` and ``two_lungs`` checks (images any of them
        refuses never reach the network)."""
        if self.lung_gate is None:
            return
        rules = replace(self.bundle.gate, min_frontal_probability=self.lung_gate.threshold)
        for item in items:
            if item.pixels is None or item.image is None:
                continue
            probabilities, item.lungs = self.lung_gate.judge(item.image)
            item.verdict = gate.head_verdict(probabilities, lung_gate.CLASSES, rules, item.verdict)
            if self.pneumonia is not None:
                flatness = processing.histogram_flatness(item.image)
                item.verdict = gate.grey_level_verdict(flatness, item.verdict)
                found = found_two_lungs(item.lungs, item.image.width, item.image.height)
                item.verdict = gate.lung_fields_verdict(found, item.verdict)
            if not item.verdict.passed:
                item.pixels = None

    def _lungs_first(self, probs: NDArray[np.float64], item: _Item) -> NDArray[np.float64]:
        """With the bundle's lung-zone pneumonia model: P(No finding) from it, the kinds
        of pneumonia in the network's proportions (:func:`abnormality.combine`)."""
        if self.pneumonia is None or item.image is None:
            return probs
        names = self.bundle.findings
        combined = abnormality.combine(
            dict(zip(names, probs.tolist(), strict=True)),
            self.pneumonia.probability(item.image, item.lungs),
            names,
        )
        return np.asarray([combined[n] for n in names], dtype=np.float64)

    def _run(self, items: list[_Item], request: _HeatmapRequest | None) -> Iterator[PredictionRow]:
        self._lung_gate_verdicts(items)
        ready = [i for i, item in enumerate(items) if item.pixels is not None]
        outputs: NetworkOutputs | None = None
        batch: NDArray[np.float32] | None = None
        if ready:
            pixels = [items[i].pixels for i in ready]
            batch = np.stack([loading.normalise(p) for p in pixels if p is not None])[:, None]
            outputs = self.forward(batch)
            self._check_outputs(outputs, len(ready))
        position = {index: row for row, index in enumerate(ready)}
        explained: dict[int, dict[str, NDArray[np.float32]]] = {}
        probabilities: dict[int, NDArray[np.float64]] = {}
        for index, item in enumerate(items):
            if outputs is None or index not in position:
                continue
            k = position[index]
            if self.lung_gate is None:
                gate_probs = gate.softmax(outputs.gate[k])
                item.verdict = gate.head_verdict(
                    gate_probs, self.bundle.gate_classes, self.bundle.gate, item.verdict
                )
            if item.verdict.passed:
                probabilities[index] = self._lungs_first(
                    calibrated_probabilities(outputs.findings[k], self.bundle.temperatures),
                    item,
                )
        if request is not None and probabilities and outputs is not None and batch is not None:
            explained = self._heatmaps(position, probabilities, batch, outputs)
        for index, item in enumerate(items):
            yield self._row(item, index, position, probabilities, outputs, explained, request)
            item.image = None  # let the decoded pixels go

    def _positive(self, probs: NDArray[np.float64]) -> list[int]:
        """Indices of the labels called positive: at or above their operating point,
        among the labels the model can call."""
        uncalled = set(self.bundle.uncalled_findings)
        return [
            k
            for k, p in enumerate(probs)
            if p >= self.bundle.thresholds[k] and self.bundle.findings[k] not in uncalled
        ]

    def _targets(self, probs: NDArray[np.float64]) -> list[int]:
        """The labels to explain: those called, else the most probable. With a lung-zone
        pneumonia model, "No finding" is its answer, not the network's: never explained."""
        candidates = list(range(len(probs)))
        if self.pneumonia is not None and coherence.NO_FINDING in self.bundle.findings:
            candidates.remove(self.bundle.findings.index(coherence.NO_FINDING))
        called = [k for k in self._positive(probs) if k in candidates]
        return called or [max(candidates, key=lambda k: probs[k])]

    def _heatmaps(
        self,
        position: Mapping[int, int],
        probabilities: Mapping[int, NDArray[np.float64]],
        batch: NDArray[np.float32],
        outputs: NetworkOutputs,
    ) -> dict[int, dict[str, NDArray[np.float32]]]:
        """Raw maps per image index and explained finding label."""
        pairs = [(index, k) for index in probabilities for k in self._targets(probabilities[index])]
        rows = np.asarray([position[index] for index, _ in pairs], dtype=np.intp)
        subset = NetworkOutputs(
            findings=outputs.findings[rows],
            severity=outputs.severity[rows],
            gate=outputs.gate[rows],
            features=outputs.features[rows],
        )
        maps = self.explain(batch[rows], subset, [k for _, k in pairs])
        explained: dict[int, dict[str, NDArray[np.float32]]] = {}
        for (index, k), raw in zip(pairs, maps, strict=True):
            explained.setdefault(index, {})[self.bundle.findings[k]] = raw
        return explained

    def _row(
        self,
        item: _Item,
        index: int,
        position: Mapping[int, int],
        probabilities: Mapping[int, NDArray[np.float64]],
        outputs: NetworkOutputs | None,
        explained: Mapping[int, Mapping[str, NDArray[np.float32]]],
        request: _HeatmapRequest | None,
    ) -> PredictionRow:
        bundle = self.bundle
        probs: dict[str, float | None] = dict.fromkeys(bundle.findings)
        severity: dict[str, SeverityScore | None] = dict.fromkeys(bundle.severity)
        positive: tuple[str, ...] | None = None
        files: list[str] = []
        maps: dict[str, NDArray[np.float32]] = {}
        summary: coherence.Summary | None = None
        if index in probabilities and outputs is not None:
            values = probabilities[index]
            probs = {label: float(p) for label, p in zip(bundle.findings, values, strict=True)}
            positive = tuple(bundle.findings[k] for k in self._positive(values))
            severity = dict(severity_scores(outputs.severity[position[index]], bundle))
            summary = summarise_row(probs, bundle)
            if request is not None:
                files, maps = self._write_heatmaps(item, explained.get(index, {}), request)
        return PredictionRow(
            file=item.name,
            image_sha256=item.sha256,
            gate=item.verdict,
            probabilities=probs,
            positive=positive,
            severity=severity,
            model_id=bundle.model_id,
            weights_sha256=bundle.weights_sha256,
            engine=self.engine,
            heatmap_files=tuple(files),
            heatmaps=maps,
            no_call=bundle.uncalled_findings,
            summary=summary,
        )

    def _write_heatmaps(
        self, item: _Item, raw_maps: Mapping[str, NDArray[np.float32]], request: _HeatmapRequest
    ) -> tuple[list[str], dict[str, NDArray[np.float32]]]:
        """Each explained finding's map on the whole image (kept and/or written as an
        overlay), led by the lung-zone map of a lungs-first bundle's P(pneumonia)."""
        files: list[str] = []
        kept: dict[str, NDArray[np.float32]] = {}
        if item.image is None:
            return files, kept
        width, height = item.image.size
        gray = grey_levels(item.image) if request.directory is not None else None
        lungs = self._lung_outline(gray) if gray is not None else None  # once per image
        stem = request.unique_stem(item.name, item.sha256) if request.directory else ""
        maps: list[tuple[str, NDArray[np.float32], NDArray[np.float32] | None]] = []
        if self.pneumonia is not None:
            zones = self.pneumonia.zone_map(item.image, item.lungs)
            maps.append((abnormality.ZONE_MAP_LABEL, zones, None))
        for label, raw in raw_maps.items():
            heat = saliency.upsample_to_image(saliency.normalise_map(raw), width, height)
            maps.append((label, heat, raw))
        for label, heat, network_map in maps:
            if request.keep_in_memory:
                kept[label] = heat
            if request.directory is not None and gray is not None:
                base = request.directory / f"{stem}.{_UNSAFE_NAME.sub('_', label)}"
                png = base.with_name(base.name + ".png")
                saliency.write_overlay(png, gray, heat, lungs, seen_box=network_map is not None)
                files.append(str(png))
                if request.raw_maps and network_map is not None:
                    npy = base.with_name(base.name + ".npy")
                    saliency.write_raw_map(npy, network_map)
                    files.append(str(npy))
        return files, kept

    def _lung_outline(self, gray: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
        """The lung mask drawn on overlays: by the lung gate's segmenter when the bundle
        has one (the engine's backend), else by the shipped one when it can run; None
        when it is not two lungs (:func:`saliency.drawable_lungs`)."""
        if self.lung_gate is not None:
            return saliency.drawable_lungs(self.lung_gate.segmenter.segment(gray))
        return saliency.lung_mask(gray)

    def _check_outputs(self, outputs: NetworkOutputs, n: int) -> None:
        bundle = self.bundle
        expected = {
            "findings": (n, len(bundle.findings)),
            "severity": (n, 2 * len(bundle.severity)),
            "gate": (n, len(bundle.gate_classes)),
        }
        for name, shape in expected.items():
            actual = getattr(outputs, name).shape
            if tuple(actual) != shape:
                raise MetadataError(
                    f"predict: model {bundle.model_id}: the network's {name} output has "
                    f"shape {tuple(actual)}, model.json implies {shape}; the weights do "
                    "not belong to this model.json"
                )


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"predict: batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class OnnxPredictor(InferenceEngine):
    """Prediction with onnxruntime on the CPU; torch is never imported.

    Args:
        bundle: a bundle with ``model.onnx`` (see the module docstring's contract).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).

    Raises:
        MissingExtraError: onnxruntime is not installed.
        MetadataError: the bundle has no ONNX file, or its outputs break the contract.
    """

    engine: ClassVar[str] = "onnx"

    def __init__(self, bundle: ModelBundle, *, threads: int | None = None) -> None:
        super().__init__(bundle)
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingExtraError("onnxruntime", "runtime") from exc
        path = bundle.onnx_path
        if not path.is_file():
            raise MetadataError(
                f"predict: model {bundle.model_id} has no {path.name} in {bundle.path}; "
                "export it or use the torch engine"
            )
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own unrelated classes
            raise MetadataError(f"predict: cannot load {path}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise MetadataError(f"predict: {path} has {len(inputs)} inputs, expected 1")
        self._input = str(inputs[0].name)
        names = [str(o.name) for o in self._session.get_outputs()]
        wanted = ("features", "findings", "severity", "gate")
        if all(name in names for name in wanted):
            self._outputs = list(wanted)
        elif len(names) == len(_FORWARD_OUTPUTS):
            # Exported without output names: CXRModel.forward's order.
            logger.debug("%s: unnamed outputs %s taken in forward order", path, names)
            by_role = dict(zip(_FORWARD_OUTPUTS, names, strict=True))
            self._outputs = [by_role[name] for name in wanted]
        else:
            raise MetadataError(
                f"predict: {path} has outputs {names}; expected features, findings, "
                "severity and gate (see covidcxr.models.runtime)"
            )
        self._weights: NDArray[np.float32] | None = None

    def forward(self, batch: NDArray[np.float32]) -> NetworkOutputs:
        """Run the ONNX network on a batch."""
        features, findings, severity, gate_logits = self._session.run(
            self._outputs, {self._input: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        return NetworkOutputs(
            findings=np.asarray(findings, dtype=np.float32),
            severity=np.asarray(severity, dtype=np.float32),
            gate=np.asarray(gate_logits, dtype=np.float32),
            features=np.asarray(features, dtype=np.float32),
        )

    def findings_weights(self) -> NDArray[np.float32]:
        """The findings head's weights, read once from the ONNX file's initializers.

        Raises:
            MissingExtraError: the ``onnx`` package is not installed.
            MetadataError: the file holds no ``heads.findings.weight`` of shape (K, C).
        """
        if self._weights is None:
            self._weights = read_onnx_initializer(
                self.bundle.onnx_path, FINDINGS_WEIGHT, rows=len(self.bundle.findings)
            )
        return self._weights


def read_onnx_initializer(path: Path, name: str, *, rows: int) -> NDArray[np.float32]:
    """A 2-D float initializer of an ONNX file, by parameter name, with ``rows`` rows.

    Exporters keep torch's parameter names, prefixed when the model was wrapped
    (``model.heads.findings.weight`` when :mod:`covidcxr.models.onnx_export` exports a
    wrapper around the network): the initializer named ``name`` or ending in
    ``"." + name`` is taken, and must be the only one.

    Raises:
        MissingExtraError: the ``onnx`` package is not installed.
        MetadataError: no such initializer, several, or another shape.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise MissingExtraError("onnx", "runtime") from exc
    model = onnx.load(str(path), load_external_data=True)
    found = [
        initializer
        for initializer in model.graph.initializer
        if initializer.name == name or initializer.name.endswith("." + name)
    ]
    if not found:
        raise MetadataError(
            f"predict: {path} has no initializer {name!r}; export the network with its "
            "parameter names kept (covidcxr.models.onnx_export does) to get CAM heatmaps"
        )
    if len(found) > 1:
        names = ", ".join(repr(i.name) for i in found)
        raise MetadataError(
            f"predict: {path} has several initializers named like {name!r}: {names}"
        )
    array = np.asarray(numpy_helper.to_array(found[0]), dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise MetadataError(
            f"predict: {path}: initializer {found[0].name!r} has shape {array.shape}, "
            f"expected ({rows}, channels)"
        )
    return np.ascontiguousarray(array)
