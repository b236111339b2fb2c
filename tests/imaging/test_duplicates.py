"""Duplicate clustering: exact and near clusters, the band search, the real collection."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from covidcxr.imaging.duplicates import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_DISTANCE_COARSE,
    DuplicateCluster,
    find_duplicates,
    hamming_pairs,
)

COVID_DIR = Path(__file__).parents[2] / ".." / "shared" / "datasets" / "covid-chestxray"

ZERO = "0" * 16


def _flip(hex_hash: str, *bits: int) -> str:
    """Flip the given bit positions (0 = most significant) of a 16-hex-digit hash."""
    value = int(hex_hash, 16)
    for bit in bits:
        value ^= 1 << (63 - bit)
    return f"{value:016x}"


def _sha(i: int) -> str:
    return f"{i:064x}"


# --- exact clusters ------------------------------------------------------------------


def test_same_file_under_two_keys_is_an_exact_cluster() -> None:
    clusters = find_duplicates(
        [
            ("p1/a.png", _sha(1), ZERO, ZERO),
            ("p2/a-copy.png", _sha(1), ZERO, ZERO),
            ("p3/other.png", _sha(2), "f" * 16, "f" * 16),
        ]
    )
    assert clusters == [
        DuplicateCluster(kind="exact", members=("p1/a.png", "p2/a-copy.png"), max_distance=0)
    ]


def test_no_duplicates() -> None:
    items = [("a", _sha(1), ZERO, ZERO), ("b", _sha(2), "f" * 16, "f" * 16)]
    assert find_duplicates(items) == []
    assert find_duplicates([]) == []


# --- near clusters: both sides of the threshold -------------------------------------


def test_near_pair_at_the_threshold_is_found_and_one_bit_more_is_not() -> None:
    near = _flip(ZERO, *range(DEFAULT_MAX_DISTANCE - 2))
    at_threshold = [("a", _sha(1), ZERO, ZERO), ("b", _sha(2), near, _flip(ZERO, 5, 9))]
    assert find_duplicates(at_threshold) == [
        DuplicateCluster(kind="near", members=("a", "b"), max_distance=DEFAULT_MAX_DISTANCE)
    ]
    beyond = [("a", _sha(1), ZERO, ZERO), ("b", _sha(2), near, _flip(ZERO, 5, 9, 11))]
    assert find_duplicates(beyond) == []


def test_distance_is_summed_over_both_hashes() -> None:
    # 6 + 6 = 12 bits: each half alone would pass, the sum does not.
    items = [
        ("a", _sha(1), ZERO, ZERO),
        ("b", _sha(2), _flip(ZERO, *range(6)), _flip(ZERO, *range(6))),
    ]
    assert find_duplicates(items) == []
    assert len(find_duplicates(items, max_distance=12)) == 1


def test_phash_only_items_use_the_coarse_threshold() -> None:
    within = [
        ("a", _sha(1), ZERO),
        ("b", _sha(2), _flip(ZERO, *range(DEFAULT_MAX_DISTANCE_COARSE))),
    ]
    assert [c.members for c in find_duplicates(within)] == [("a", "b")]
    beyond = [
        ("a", _sha(1), ZERO),
        ("b", _sha(2), _flip(ZERO, *range(DEFAULT_MAX_DISTANCE_COARSE + 1))),
    ]
    assert find_duplicates(beyond) == []
    # A 4-tuple whose detail hash is None counts as phash-only.
    assert len(find_duplicates([("a", _sha(1), ZERO, None), ("b", _sha(2), ZERO, None)])) == 1


def test_identical_hashes_of_different_files_are_near_at_distance_zero() -> None:
    clusters = find_duplicates([("a", _sha(1), ZERO, ZERO), ("b", _sha(2), ZERO, ZERO)])
    assert clusters == [DuplicateCluster(kind="near", members=("a", "b"), max_distance=0)]


def test_near_clusters_are_transitive_and_report_their_diameter() -> None:
    a = ZERO
    b = _flip(ZERO, *range(8))  # a-b: 8 bits
    c = _flip(b, *range(8, 16))  # b-c: 8 bits, a-c: 16 bits
    far = "f" * 16
    clusters = find_duplicates(
        [
            ("a", _sha(1), a, ZERO),
            ("b", _sha(2), b, ZERO),
            ("c", _sha(3), c, ZERO),
            ("x", _sha(4), far, far),
        ],
        max_distance=8,
    )
    assert clusters == [DuplicateCluster(kind="near", members=("a", "b", "c"), max_distance=16)]


def test_exact_copies_join_their_near_cluster_with_all_keys() -> None:
    clusters = find_duplicates(
        [
            ("p1.png", _sha(1), ZERO, ZERO),
            ("p1-again.png", _sha(1), ZERO, ZERO),
            ("p9-resized.png", _sha(2), _flip(ZERO, 3), ZERO),
        ]
    )
    assert clusters == [
        DuplicateCluster(kind="exact", members=("p1-again.png", "p1.png"), max_distance=0),
        DuplicateCluster(
            kind="near", members=("p1-again.png", "p1.png", "p9-resized.png"), max_distance=1
        ),
    ]


def test_two_separate_near_clusters_are_sorted() -> None:
    one = "0123456789abcdef"
    two = "fedcba9876543210"
    clusters = find_duplicates(
        [
            ("z1", _sha(1), two, two),
            ("z2", _sha(2), _flip(two, 0), two),
            ("a1", _sha(3), one, one),
            ("a2", _sha(4), _flip(one, 63), one),
        ]
    )
    assert [c.members for c in clusters] == [("a1", "a2"), ("z1", "z2")]


# --- input validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "match"),
    [
        pytest.param(
            [("a", _sha(1), ZERO, ZERO), ("a", _sha(2), ZERO, ZERO)],
            "key 'a' appears twice",
            id="repeated-key",
        ),
        pytest.param(
            [("a", _sha(1), "xyz", ZERO)], "hash 'xyz' of 'a' is not 16 hex characters", id="short"
        ),
        pytest.param(
            [("a", _sha(1), "g" * 16, ZERO)], "of 'a' is not 16 hex characters", id="not-hex"
        ),
        pytest.param(
            [("a", _sha(1), ZERO, ZERO), ("b", _sha(2), ZERO)],
            "mix phash-only and phash\\+phash_detail .* at 'b'",
            id="mixed-widths",
        ),
        pytest.param(
            [("a", _sha(1), ZERO, ZERO), ("b", _sha(1), "f" * 16, ZERO)],
            "has different hashes under 'a' and 'b'; rehash",
            id="sha-with-two-hashes",
        ),
        pytest.param([("a", _sha(1))], "must be \\(key, sha256, phash", id="too-short"),
        pytest.param([("a", _sha(1), None, ZERO)], "'a' has no phash; leave out", id="no-phash"),
    ],
)
def test_malformed_items_are_refused(items: list[tuple[str, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=f"find_duplicates: .*{match}"):
        find_duplicates(items)  # type: ignore[arg-type]


def test_negative_max_distance_is_refused() -> None:
    with pytest.raises(ValueError, match="find_duplicates: max_distance must be >= 0, got -1"):
        find_duplicates([("a", _sha(1), ZERO)], max_distance=-1)
    with pytest.raises(ValueError, match="hamming_pairs: max_distance must be >= 0"):
        hamming_pairs(np.zeros(2, np.uint64), -1)


def test_hamming_pairs_rejects_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="codes must be uint64"):
        hamming_pairs(np.zeros(3, np.int64), 2)  # type: ignore[arg-type]


# --- the band search against brute force ------------------------------------------


def _brute_force(codes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    found = set()
    rows = codes.reshape(len(codes), -1)
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            distance = sum(int(a ^ b).bit_count() for a, b in zip(rows[i], rows[j], strict=True))
            if distance <= max_distance:
                found.add((i, j))
    return found


@pytest.mark.parametrize(
    ("n_words", "max_distance"),
    [(1, 0), (1, 3), (1, 8), (1, 20), (2, 5), (2, 10), (2, 14), (2, 40), (1, 64)],
)
def test_hamming_pairs_matches_brute_force(n_words: int, max_distance: int) -> None:
    rng = np.random.default_rng(max_distance * 10 + n_words)
    centres = rng.integers(
        0, np.iinfo(np.uint64).max, (25, n_words), dtype=np.uint64, endpoint=True
    )
    codes = []
    for centre in centres:  # clusters of codes a few bits apart, plus exact repeats
        for _ in range(6):
            code = centre.copy()
            for _ in range(rng.integers(0, max_distance + 4)):
                word, bit = rng.integers(0, n_words), rng.integers(0, 64)
                code[word] ^= np.uint64(1) << np.uint64(bit)
            codes.append(code)
    array = np.array(codes, dtype=np.uint64)
    first, second, distances = hamming_pairs(array, max_distance)
    assert set(zip(first.tolist(), second.tolist(), strict=True)) == _brute_force(
        array, max_distance
    )
    assert np.all(first < second)
    assert np.all(distances <= max_distance)
    one_word = array[:, 0] if n_words == 1 else None
    if one_word is not None:  # 1-D input works too
        assert len(hamming_pairs(one_word, max_distance)[0]) == len(first)


def test_hamming_pairs_of_fewer_than_two_codes() -> None:
    assert all(len(part) == 0 for part in hamming_pairs(np.zeros(1, np.uint64), 3))


@pytest.mark.slow
def test_100k_random_hashes_cluster_and_find_the_planted_pair() -> None:
    rng = np.random.default_rng(2024)
    n = 100_000
    words = rng.integers(0, np.iinfo(np.uint64).max, (n, 2), dtype=np.uint64, endpoint=True)
    hexes = [(f"{hi:016x}", f"{lo:016x}") for hi, lo in words.tolist()]
    items = [(f"img{i}", _sha(i), hi, lo) for i, (hi, lo) in enumerate(hexes)]
    planted_hi = _flip(hexes[17][0], 1, 30, 62)
    planted_lo = _flip(hexes[17][1], 7, 44)
    items.append(("planted", _sha(n + 1), planted_hi, planted_lo))
    items.append(("exact", _sha(99), hexes[99][0], hexes[99][1]))
    clusters = find_duplicates(items)
    assert DuplicateCluster(kind="exact", members=("exact", "img99"), max_distance=0) in clusters
    assert DuplicateCluster(kind="near", members=("img17", "planted"), max_distance=5) in clusters
    # Random 128-bit codes are ~64 bits apart: nothing else may be near at 10 bits.
    assert len(clusters) == 2


# --- the real collection -----------------------------------------------------------------

# Pictures filed twice, found by screening every pair and checked by eye (see the
# module docstring of covidcxr.imaging.duplicates).
EXPECTED_NEAR = [
    {
        "16660_2_1.jpg",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-admission.jpg",
    },
    {
        "16660_3_1.jpg",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-1.jpg",
    },
    {
        "16660_4_1.jpg",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-2.jpg",
    },
    {
        "16660_5_1.jpg",
        "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-3.jpg",
    },
    {"353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.jpeg", "case_72_RX-TORACE1.jpg"},
    {"35AF5C3B-D04D-4B4B-92B7-CB1F67D83085.jpeg", "D5ACAA93-C779-4E22-ADFA-6A220489F840.jpeg"},
    {"AR-1.jpg", "AR-2.jpg", "extubation-1.jpg"},
    {
        "auntminnie-2020_01_31_20_24_2322_2020_01_31_x-ray_coronavirus_US.jpg",
        "nejmoa2001191_f5-PA.jpeg",
    },
]
# Look-alikes that are different pictures: one patient on other days, neighbouring CT
# slices, two different patients.
DIFFERENT = [
    ("nejmoa2001191_f1-PA.jpeg", "nejmoa2001191_f3-PA.jpeg"),
    ("02b76460.jpg", "730a0b8f.jpg"),
    ("16630_2_1.jpg", "16630_5_1.jpg"),
    ("b0f1684d1ee90dc09deef015e29dae_jumbo.jpeg", "covid-19-caso-95-3-14.png"),
]


@pytest.mark.shared_data
@pytest.mark.slow
def test_near_duplicates_of_the_real_collection() -> None:
    from covidcxr.imaging.decode import read_image_file
    from covidcxr.imaging.hashing import image_hashes

    if not (COVID_DIR / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {COVID_DIR.resolve()}")
    with (COVID_DIR / "manifest.csv").open(encoding="utf-8", newline="") as handle:
        names = [row["filename"] for row in csv.DictReader(handle)]
    assert len(names) == 724
    items = []
    for name in names:  # read only: nothing is written under ../shared
        data, decoded = read_image_file(COVID_DIR / "images" / name)
        hashes = image_hashes(decoded.image)
        decoded.image.close()
        items.append((name, hashlib.sha256(data).hexdigest(), hashes.phash, hashes.phash_detail))
    clusters = find_duplicates(items)

    exact = [set(c.members) for c in clusters if c.kind == "exact"]
    assert exact == [
        {
            "3d4364c0e44859e86017ee1660112e_jumbo-1.jpeg",
            "81ba2932af55c7663e9d87016776a6_jumbo-1.jpeg",
        }
    ]
    near = [set(c.members) for c in clusters if c.kind == "near"]
    for expected in EXPECTED_NEAR:
        assert expected in near, f"{sorted(expected)} not clustered"
    assert len(near) <= len(EXPECTED_NEAR) + 2  # room for decoder drift, not for noise
    cluster_of: dict[str, int] = defaultdict(lambda: -1)
    for index, members in enumerate(near):
        for member in members:
            cluster_of[member] = index
    for a, b in DIFFERENT:
        assert cluster_of[a] == -1 or cluster_of[a] != cluster_of[b], f"{a} ~ {b}"
