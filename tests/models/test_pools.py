"""Training pools: each epoch shows every findings and fixed gate image, a seeded draw
of the other frontal images and fresh drawn pictures; sample sets drop held patients."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from covidcxr.models.pools import NO_GATE_CLASS, Pool, TrainingPools
from covidcxr.models.sample_sets import CT, FRONTAL, LATERAL, NOT_MEDICAL

SIZE, LABELS = 32, 3


def _pool(gate: list[int], patient: str) -> Pool:
    n = len(gate)
    pixels = np.arange(n * SIZE * SIZE, dtype=np.int64).reshape(n, SIZE, SIZE) % 256
    return Pool(
        pixels.astype(np.uint8),
        np.zeros((n, LABELS), np.float32),
        np.array(gate, dtype=np.int64),
        [f"{patient}{i}" for i in range(n)],
    )


def _pools() -> TrainingPools:
    findings = _pool([FRONTAL] * 6 + [NO_GATE_CLASS], "f")
    gate_train = _pool([FRONTAL, LATERAL, FRONTAL, CT, FRONTAL, FRONTAL], "g")
    return TrainingPools(
        findings_train=findings,
        findings_val=findings.take(np.array([0, 1], dtype=np.int64)),
        gate_train=gate_train,
        val=findings,
        other_per_epoch=2,
        drawn_per_epoch=3,
    )


def test_epoch_holds_findings_fixed_gate_a_draw_and_pictures() -> None:
    pools = _pools()
    assert pools.base_count == 7 + 2 + 2
    epoch = pools.epoch(np.random.default_rng(0))
    assert len(epoch) == pools.base_count + pools.drawn_per_epoch
    gate = epoch.gate.tolist()
    assert gate[:7] == pools.findings_train.gate.tolist()
    assert gate[7:9] == [LATERAL, CT]  # shown every epoch
    assert gate[9:11] == [FRONTAL, FRONTAL]  # two of the four other frontals
    assert gate[11:] == [NOT_MEDICAL] * 3 and epoch.patients[11:] == ["drawn"] * 3
    assert np.isnan(epoch.labels[11:]).all()  # drawn pictures have no findings
    again = pools.epoch(np.random.default_rng(0))
    np.testing.assert_array_equal(epoch.pixels, again.pixels)


def test_pool_join_and_empty() -> None:
    empty = Pool.empty(SIZE, LABELS)
    assert len(empty) == 0 and empty.labels.shape == (0, LABELS)
    joined = Pool.join([_pool([FRONTAL], "a"), empty, _pool([CT, LATERAL], "b")])
    assert len(joined) == 3 and joined.patients == ["a0", "b0", "b1"]
    assert joined.gate.tolist() == [FRONTAL, CT, LATERAL]
