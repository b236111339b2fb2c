"""Exact and near-duplicate clusters of images, from hashes alone (no database code).

Input: one item per image reference, ``(key, sha256, phash[, phash_detail])`` with the
hashes as 16-character hex strings from :func:`covidcxr.imaging.hashing.image_hashes`.
Output: :class:`DuplicateCluster` objects of two kinds:

* ``exact``: one sha256 under several keys (the same file referenced twice);
* ``near``: several different sha256 whose hashes are within ``max_distance`` bits,
  joined transitively (union-find), e.g. one radiograph resized, recompressed, framed
  or cropped a little, filed under different patients. Its members are all keys of
  all those files, so an exact pair that is also near something appears in both.

Distance: with ``phash_detail`` on every item, the Hamming distance over all 128 bits
(coarse + detail); with ``phash`` only, over its 64 bits. Mixing the two is refused.

:data:`DEFAULT_MAX_DISTANCE` is 10 of 128 bits (:data:`DEFAULT_MAX_DISTANCE_COARSE`, 3,
for the 64-bit ``phash`` alone): the largest with no false pair on ``covid-chestxray``
(docs/decisions/0040-duplicate-hash-threshold.md). Clusters are candidates for review,
not proof.

Candidates come from multi-index hashing: the bits are split into bands; two codes
within ``d`` bits agree within ``d // m`` bits on at least one of ``m`` bands, so only
the keys near each band are compared on all bits.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

#: Largest 128-bit (``phash`` + ``phash_detail``) distance of a near-duplicate pair.
DEFAULT_MAX_DISTANCE = 10
#: Largest distance when items carry the 64-bit ``phash`` only.
DEFAULT_MAX_DISTANCE_COARSE = 3

_WORD_BITS = 64
_HEX_CHARS = _WORD_BITS // 4
# Bands of up to this many bits are looked up in a dense table (2**24 int64 = 128 MB
# is the most we allow); wider bands are looked up by binary search.
_MAX_DENSE_BAND_BITS = 22
# Expand at most this many candidate pairs at once (bounds memory on skewed data).
_CANDIDATE_CHUNK = 4_000_000
# Above this many distinct codes in one cluster, max_distance is taken over linked
# pairs only instead of all pairs.
_MAX_EXACT_DIAMETER_CODES = 4096

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

Item = tuple[str, str, str] | tuple[str, str, str, str | None]


@dataclass(frozen=True)
class DuplicateCluster:
    """A group of image references that hold the same or nearly the same picture.

    Attributes:
        kind: ``"exact"`` (one sha256 under several keys) or ``"near"`` (several
            sha256 with hashes within the threshold, joined transitively).
        members: the keys, sorted.
        max_distance: the largest Hamming distance between any two members' hashes
            (0 for exact clusters). Larger than the threshold means the cluster was
            joined through intermediate members.
    """

    kind: Literal["exact", "near"]
    members: tuple[str, ...]
    max_distance: int


def find_duplicates(
    items: Iterable[Item], *, max_distance: int | None = None
) -> list[DuplicateCluster]:
    """Find exact and near-duplicate clusters among image references.

    Args:
        items: ``(key, sha256, phash)`` or ``(key, sha256, phash, phash_detail)`` per
            image reference; hashes are 16 hex characters. Keys must be unique.
        max_distance: largest Hamming distance of a near pair, in bits over all the
            bits compared; default :data:`DEFAULT_MAX_DISTANCE` (128-bit items) or
            :data:`DEFAULT_MAX_DISTANCE_COARSE` (64-bit items).

    Returns:
        Exact clusters, then near clusters, each group sorted by first member.

    Raises:
        ValueError: on a repeated key, a malformed hash, one sha256 given two different
            hashes, items that mix 64-bit and 128-bit hashes, or a negative
            ``max_distance``.
    """
    keys, shas, codes = _parse_items(items)
    n_words = codes.shape[1] if codes.ndim == 2 else 1
    if max_distance is None:
        max_distance = DEFAULT_MAX_DISTANCE if n_words == 2 else DEFAULT_MAX_DISTANCE_COARSE
    if max_distance < 0:
        raise ValueError(f"find_duplicates: max_distance must be >= 0, got {max_distance}")
    if not keys:
        return []

    keys_by_sha: dict[str, list[str]] = defaultdict(list)
    code_by_sha: dict[str, int] = {}
    for index, (key, sha) in enumerate(zip(keys, shas, strict=True)):
        keys_by_sha[sha].append(key)
        if sha not in code_by_sha:
            code_by_sha[sha] = index
        elif not np.array_equal(codes[code_by_sha[sha]], codes[index]):
            first_key = keys[code_by_sha[sha]]
            raise ValueError(
                f"find_duplicates: sha256 {sha} has different hashes under {first_key!r} and "
                f"{key!r}; rehash both with the same covidcxr version"
            )

    clusters = [
        DuplicateCluster(kind="exact", members=tuple(sorted(members)), max_distance=0)
        for members in keys_by_sha.values()
        if len(members) > 1
    ]

    # Near duplicates: one row per distinct sha256, then one node per distinct code.
    unique_shas = list(code_by_sha)
    sha_codes = codes[[code_by_sha[sha] for sha in unique_shas]]
    node_codes, node_of_sha = np.unique(sha_codes, axis=0, return_inverse=True)
    node_of_sha = node_of_sha.reshape(-1)
    first, second, distances = hamming_pairs(node_codes, max_distance)
    component = _components(len(node_codes), first, second)

    shas_by_component: dict[int, list[int]] = defaultdict(list)
    for sha_index, node in enumerate(node_of_sha.tolist()):
        shas_by_component[component[node]].append(sha_index)
    edge_max: dict[int, int] = defaultdict(int)
    for node, distance in zip(first.tolist(), distances.tolist(), strict=True):
        root = component[node]
        edge_max[root] = max(edge_max[root], distance)
    near = []
    for root, sha_indices in shas_by_component.items():
        if len(sha_indices) < 2:
            continue
        members = sorted(key for i in sha_indices for key in keys_by_sha[unique_shas[i]])
        nodes = np.unique(node_of_sha[sha_indices])
        near.append(
            DuplicateCluster(
                kind="near",
                members=tuple(members),
                max_distance=_diameter(node_codes[nodes], edge_max[root]),
            )
        )
    clusters.sort(key=lambda cluster: cluster.members)
    near.sort(key=lambda cluster: cluster.members)
    logger.info(
        "find_duplicates: %d references, %d exact and %d near clusters (max_distance=%d)",
        len(keys),
        len(clusters),
        len(near),
        max_distance,
    )
    return clusters + near


def hamming_pairs(
    codes: NDArray[np.uint64], max_distance: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.int64]]:
    """Find every pair of codes within ``max_distance`` bits (multi-index hashing).

    Args:
        codes: shape ``(n,)`` or ``(n, words)``, each row one code of ``64 * words``
            bits (word 0 holds the first, most significant bits).
        max_distance: largest Hamming distance reported.

    Returns:
        ``(first, second, distance)`` arrays with ``first < second``, each pair once,
        sorted by ``(first, second)``.

    Raises:
        ValueError: if ``max_distance`` is negative or ``codes`` has the wrong shape.
    """
    if max_distance < 0:
        raise ValueError(f"hamming_pairs: max_distance must be >= 0, got {max_distance}")
    words = _as_words(codes)
    n, n_words = words.shape
    empty = (np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0, np.int64))
    if n < 2:
        return empty
    n_bits = n_words * _WORD_BITS
    if max_distance >= n_bits:
        first, second = np.triu_indices(n, 1)
        return first, second, _distances(words, first, second)

    bands = _choose_bands(n, n_bits, max_distance)
    radius = max_distance // len(bands)
    bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)
    found: list[NDArray[np.int64]] = []
    for start, stop in bands:
        found.extend(_band_pairs(words, bits[:, start:stop], radius, max_distance))
    if not found:
        return empty
    pair_ids = np.unique(np.concatenate(found))
    first = (pair_ids // n).astype(np.intp)
    second = (pair_ids % n).astype(np.intp)
    return first, second, _distances(words, first, second)


def _parse_items(items: Iterable[Item]) -> tuple[list[str], list[str], NDArray[np.uint64]]:
    keys: list[str] = []
    shas: list[str] = []
    values: list[list[int]] = []
    seen: set[str] = set()
    widths: set[int] = set()
    for item in items:
        if len(item) not in (3, 4):
            raise ValueError(
                f"find_duplicates: item {item!r} must be (key, sha256, phash[, phash_detail])"
            )
        key, sha, coarse = item[0], item[1], item[2]
        if coarse is None:
            raise ValueError(
                f"find_duplicates: {key!r} has no phash; leave out images that failed to decode"
            )
        detail = item[3] if len(item) == 4 else None
        hashes = [coarse] if detail is None else [coarse, detail]
        if key in seen:
            raise ValueError(f"find_duplicates: key {key!r} appears twice; keys must be unique")
        seen.add(key)
        widths.add(len(hashes))
        if len(widths) > 1:
            raise ValueError(
                "find_duplicates: items mix phash-only and phash+phash_detail hashes "
                f"(first mismatch at {key!r}); compute both hashes for every image"
            )
        keys.append(key)
        shas.append(sha)
        values.append([_parse_hex(h, key) for h in hashes])
    n_words = widths.pop() if widths else 1
    return keys, shas, np.array(values, dtype=np.uint64).reshape(len(keys), n_words)


def _parse_hex(value: str, key: str) -> int:
    if not isinstance(value, str) or len(value) != _HEX_CHARS:
        raise ValueError(
            f"find_duplicates: hash {value!r} of {key!r} is not 16 hex characters; "
            "use covidcxr.imaging.hashing.image_hashes"
        )
    try:
        return int(value, 16)
    except ValueError:
        raise ValueError(
            f"find_duplicates: hash {value!r} of {key!r} is not 16 hex characters; "
            "use covidcxr.imaging.hashing.image_hashes"
        ) from None


def _as_words(codes: NDArray[np.uint64]) -> NDArray[np.uint64]:
    words = np.asarray(codes)
    if words.ndim == 1:
        words = words.reshape(-1, 1)
    if words.ndim != 2 or words.shape[1] < 1 or words.dtype != np.uint64:
        raise ValueError(
            f"hamming_pairs: codes must be uint64 of shape (n,) or (n, words), got "
            f"{words.dtype} {words.shape}"
        )
    return np.ascontiguousarray(words)


def _popcount(values: NDArray[np.uint64]) -> NDArray[np.int64]:
    bitwise_count = getattr(np, "bitwise_count", None)
    counts: NDArray[np.int64]
    if bitwise_count is not None:  # numpy >= 2.0
        counts = np.asarray(bitwise_count(values), dtype=np.int64)
    else:
        as_bytes = values.reshape(-1, 1).view(np.uint8)
        counts = _BYTE_POPCOUNT[as_bytes].sum(axis=1).reshape(values.shape)
    return counts


def _distances(
    words: NDArray[np.uint64], first: NDArray[np.intp], second: NDArray[np.intp]
) -> NDArray[np.int64]:
    distances: NDArray[np.int64] = _popcount(words[first] ^ words[second]).sum(axis=1)
    return distances


def _ball_size(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(min(radius, width) + 1))


def _split(n_bits: int, n_bands: int) -> list[tuple[int, int]]:
    edges = [round(i * n_bits / n_bands) for i in range(n_bands + 1)]
    return list(itertools.pairwise(edges))


def _choose_bands(n: int, n_bits: int, max_distance: int) -> list[tuple[int, int]]:
    """Pick the band split with the least estimated work.

    Work per band: every code probes every key within the radius (a vectorised pass
    over all codes per probe), and each probe yields ~n / 2**width candidates to
    verify, which costs about three times as much per element.
    """
    smallest = max(1, math.ceil(n_bits / 40))
    largest = max(smallest, min(n_bits, max_distance + 1))
    best: tuple[float, list[tuple[int, int]]] | None = None
    for n_bands in range(smallest, largest + 1):
        radius = max_distance // n_bands
        bands = _split(n_bits, n_bands)
        cost = 0.0
        for start, stop in bands:
            width = stop - start
            probes = _ball_size(width, radius)
            if width <= _MAX_DENSE_BAND_BITS:
                probe_cost, table_cost = 1.0, 2.0**width * 0.1
            else:  # two binary searches per probe instead of two table reads
                probe_cost, table_cost = 2.0 * math.log2(max(n, 2)), 0.0
            cost += n * probes * (probe_cost + 3.0 * n / 2.0**width) + table_cost
        if best is None or cost < best[0]:
            best = (cost, bands)
    assert best is not None
    return best[1]


def _band_pairs(
    words: NDArray[np.uint64],
    band_bits: NDArray[np.uint8],
    radius: int,
    max_distance: int,
) -> list[NDArray[np.int64]]:
    """Verified pairs (encoded as ``first * n + second``) found through one band."""
    n, width = band_bits.shape
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    keys = band_bits.astype(np.int64) @ weights
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dense = width <= _MAX_DENSE_BAND_BITS
    if dense:
        counts_table = np.bincount(keys, minlength=1 << width)
        starts_table = np.cumsum(counts_table) - counts_table
    found: list[NDArray[np.int64]] = []
    for flip in _flip_masks(width, radius):
        probe = keys ^ flip
        if dense:
            counts = counts_table[probe]
            starts = starts_table[probe]
        else:
            starts = np.searchsorted(sorted_keys, probe, side="left")
            counts = np.searchsorted(sorted_keys, probe, side="right") - starts
        hits = np.flatnonzero(counts)
        for chunk in _chunks(hits, counts[hits]):
            chunk_counts = counts[chunk]
            total = int(chunk_counts.sum())
            first = np.repeat(chunk, chunk_counts)
            offsets = np.arange(total) - np.repeat(
                np.cumsum(chunk_counts) - chunk_counts, chunk_counts
            )
            second = order[np.repeat(starts[chunk], chunk_counts) + offsets]
            # The same pair is also reached from the other end (or is a self-match).
            keep = first < second
            first, second = first[keep], second[keep]
            close = _distances(words, first, second) <= max_distance
            found.append(first[close].astype(np.int64) * n + second[close])
    return found


def _flip_masks(width: int, radius: int) -> list[int]:
    masks = [0]
    for flips in range(1, min(radius, width) + 1):
        for positions in itertools.combinations(range(width), flips):
            masks.append(sum(1 << p for p in positions))
    return masks


def _chunks(hits: NDArray[np.intp], counts: NDArray[np.int64]) -> Iterable[NDArray[np.intp]]:
    """Split ``hits`` so that no chunk expands to more than ``_CANDIDATE_CHUNK`` pairs."""
    if hits.size == 0:
        return
    cumulative = np.cumsum(counts)
    start = 0
    while start < hits.size:
        base = cumulative[start - 1] if start else 0
        stop = int(np.searchsorted(cumulative, base + _CANDIDATE_CHUNK, side="right"))
        stop = max(stop, start + 1)
        yield hits[start:stop]
        start = stop


def _components(n: int, first: NDArray[np.intp], second: NDArray[np.intp]) -> Sequence[int]:
    """Union-find over ``n`` nodes; returns each node's root."""
    parent = list(range(n))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving
            node = parent[node]
        return node

    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return [find(node) for node in range(n)]


def _diameter(words: NDArray[np.uint64], linked_max: int) -> int:
    """Largest pairwise distance among a cluster's distinct codes."""
    count = words.shape[0]
    if count < 2:
        return 0
    if count > _MAX_EXACT_DIAMETER_CODES:
        logger.warning(
            "find_duplicates: a near cluster has %d distinct hashes; its max_distance is "
            "taken over linked pairs only",
            count,
        )
        return linked_max
    first, second = np.triu_indices(count, 1)
    return int(_distances(words, first, second).max())
