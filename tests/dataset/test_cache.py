"""The preprocessed-pixel cache: pack files shared by threads and processes, damage."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covidcxr.dataset.cache import CACHE_VERSION, PreprocessCache, stale_folders

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
HEADER = 48


def _noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def _record(cache: PreprocessCache, sha: str) -> tuple[Path, int]:
    """The pack and offset of ``sha``'s (first) record, found by reading the files."""
    for pack in cache.packs():
        data = pack.read_bytes()
        at = data.find(bytes.fromhex(sha))
        if at >= 0:
            return pack, at - 8
    raise AssertionError(f"no record of {sha[:8]} in {cache.folder}")


def _failing_after_first() -> Any:
    calls = {"n": 0}

    def load() -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 1:
            raise AssertionError("decoded twice: the cache was not used")
        return _noise(24, seed=3)

    return load


def test_hit_returns_identical_pixels_without_decoding(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 24)
    load = _failing_after_first()
    first = cache.get_or_load(SHA_A, load)
    second = cache.get_or_load(SHA_A, load)
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.uint8
    assert second.shape == (24, 24)
    second[0, 0] ^= 1  # the caller's own copy: writable, and the cache is unchanged
    np.testing.assert_array_equal(cache.get(SHA_A), first)
    [pack] = cache.packs()
    assert pack.parent == tmp_path / f"v{CACHE_VERSION}-24-center"
    assert pack.name.startswith(f"{os.getpid()}-") and pack.suffix == ".pack"
    assert pack.stat().st_size == HEADER + 24 * 24


def test_one_pack_per_process_not_one_file_per_image(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 8)
    for i in range(50):
        cache.put(f"{i:064x}", _noise(8, seed=i))
    [pack] = cache.packs()
    assert list(cache.folder.iterdir()) == [pack]
    assert pack.stat().st_size == 50 * (HEADER + 64)
    reader = PreprocessCache(tmp_path, 8)  # another process would see the same
    for i in range(50):
        np.testing.assert_array_equal(reader.get(f"{i:064x}"), _noise(8, seed=i))


def test_indexed_says_what_this_cache_knows_without_reading(tmp_path: Path) -> None:
    writer = PreprocessCache(tmp_path, 8)
    reader = PreprocessCache(tmp_path, 8)
    assert not writer.indexed(SHA_A)
    writer.put(SHA_A, _noise(8))
    assert writer.indexed(SHA_A)
    assert not reader.indexed(SHA_A)  # on disk, but this cache has not looked
    assert reader.get(SHA_A) is not None
    assert reader.indexed(SHA_A)
    with pytest.raises(ValueError, match="not a lowercase hex sha256"):
        reader.indexed("x")


def test_key_has_size_crop_and_kind(tmp_path: Path) -> None:
    folders = {
        PreprocessCache(tmp_path, 24).folder,
        PreprocessCache(tmp_path, 32).folder,
        PreprocessCache(tmp_path, 24, "pad").folder,
        PreprocessCache(tmp_path, 24, kind="mask").folder,
    }
    assert len(folders) == 4
    small = PreprocessCache(tmp_path, 24)
    small.put(SHA_A, _noise(24))
    assert small.get(SHA_B) is None
    assert PreprocessCache(tmp_path, 32).get(SHA_A) is None
    assert PreprocessCache(tmp_path, 24, kind="mask").get(SHA_A) is None


def test_repr_and_folder(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 16, "pad", kind="mask")
    assert cache.folder == tmp_path / f"v{CACHE_VERSION}-16-pad-mask"
    assert str(cache.folder) in repr(cache)
    assert cache.packs() == []


def test_refuses_bad_keys_and_pixels(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 8)
    with pytest.raises(ValueError, match="not a lowercase hex sha256"):
        cache.get("ABC")
    with pytest.raises(ValueError, match="not a lowercase hex sha256"):
        cache.put("A" * 64, _noise(8))
    with pytest.raises(ValueError, match="expected uint8 8x8"):
        cache.put(SHA_A, np.zeros((8, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8 8x8"):
        cache.put(SHA_A, np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="kind"):
        PreprocessCache(tmp_path, 8, kind="depth")  # type: ignore[arg-type]
    assert cache.packs() == []


# -- damage -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "zeros", "magic", "other size", "empty"])
def test_damaged_record_is_ignored_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    writer = PreprocessCache(tmp_path, 24)
    good = _noise(24, seed=3)
    writer.put(SHA_A, good)
    writer.put(SHA_B, good)
    pack, at = _record(writer, SHA_B)
    data = bytearray(pack.read_bytes())
    record = HEADER + 24 * 24
    if damage == "torn":  # a crash in the middle of the last record
        del data[at + record - 100 :]
    elif damage == "zeros":  # a file system that kept the length, not the data
        data[at : at + record] = bytes(record)
    elif damage == "magic":
        data[at] ^= 0xFF
    elif damage == "other size":
        data[at + 40] = 25
    else:
        data.clear()
    pack.write_bytes(bytes(data))
    reader = PreprocessCache(tmp_path, 24)
    assert reader.get(SHA_B) is None
    if damage != "empty":  # the record before the damaged one is still there
        np.testing.assert_array_equal(reader.get(SHA_A), good)
    rebuilt = reader.get_or_load(SHA_B, lambda: good)
    np.testing.assert_array_equal(rebuilt, good)
    np.testing.assert_array_equal(PreprocessCache(tmp_path, 24).get(SHA_B), good)


def test_record_damaged_after_indexing_is_reported_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PreprocessCache(tmp_path, 24)
    good = _noise(24, seed=3)
    cache.put(SHA_A, good)
    pack, at = _record(cache, SHA_A)
    with pack.open("r+b") as handle:
        handle.seek(at + 8)
        handle.write(bytes.fromhex(SHA_B))  # the record now claims another image
    with caplog.at_level(logging.WARNING, logger="covidcxr.dataset.cache"):
        assert cache.get(SHA_A) is None
    assert "corrupt" in caplog.text
    np.testing.assert_array_equal(cache.get_or_load(SHA_A, lambda: good), good)
    np.testing.assert_array_equal(cache.get(SHA_A), good)


def test_short_write_abandons_the_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that stores fewer bytes than a record (a full disk) is not indexed, and
    nothing is appended after it: the next record goes to a new pack."""
    cache = PreprocessCache(tmp_path, 8)
    cache.put(SHA_A, _noise(8, seed=1))
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, parts, offset: real(fd, parts[:1], offset))
    with caplog.at_level(logging.WARNING, logger="covidcxr.dataset.cache"):
        cache.put(SHA_B, _noise(8, seed=2))
    assert "short write (48 of 112 bytes)" in caplog.text
    assert cache.get(SHA_B) is None
    monkeypatch.setattr(os, "pwritev", real)
    cache.put(SHA_C, _noise(8, seed=3))
    assert len(cache.packs()) == 2
    reader = PreprocessCache(tmp_path, 8)
    assert reader.get(SHA_B) is None
    np.testing.assert_array_equal(reader.get(SHA_A), _noise(8, seed=1))
    np.testing.assert_array_equal(reader.get(SHA_C), _noise(8, seed=3))


def test_unwritable_cache_warns_once_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    cache = PreprocessCache(blocker, 8)
    pixels = _noise(8)
    with caplog.at_level(logging.WARNING, logger="covidcxr.dataset.cache"):
        np.testing.assert_array_equal(cache.get_or_load(SHA_A, lambda: pixels), pixels)
        np.testing.assert_array_equal(cache.get_or_load(SHA_B, lambda: pixels), pixels)
    assert caplog.text.count("cannot write") == 1


def test_cache_deleted_while_in_use_is_made_again(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache", 8)
    cache.put(SHA_A, _noise(8, seed=1))
    shutil.rmtree(tmp_path / "cache")
    assert cache.get(SHA_B) is None  # notices that the folder is gone
    cache.put(SHA_B, _noise(8, seed=2))
    assert len(cache.packs()) == 1
    reader = PreprocessCache(tmp_path / "cache", 8)
    assert reader.get(SHA_A) is None
    np.testing.assert_array_equal(reader.get(SHA_B), _noise(8, seed=2))


# -- several writers --------------------------------------------------------------------


def test_concurrent_threads_write_a_key_once(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 64)
    pixels = _noise(64, seed=9)

    def write(i: int) -> np.ndarray | None:
        cache.put(SHA_A if i % 2 else SHA_B, pixels)
        return cache.get(SHA_A if i % 2 else SHA_B)

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(write, range(64)))
    for got in seen:
        assert got is not None
        np.testing.assert_array_equal(got, pixels)
    [pack] = cache.packs()
    assert pack.stat().st_size == 2 * (HEADER + 64 * 64)


def test_records_of_another_cache_are_found_later(tmp_path: Path) -> None:
    reader = PreprocessCache(tmp_path, 8)
    assert reader.get(SHA_A) is None  # indexed an empty cache
    writer = PreprocessCache(tmp_path, 8)
    writer.put(SHA_A, _noise(8, seed=1))
    np.testing.assert_array_equal(reader.get(SHA_A), _noise(8, seed=1))
    writer.put(SHA_B, _noise(8, seed=2))  # appended to a pack the reader already knows
    np.testing.assert_array_equal(reader.get(SHA_B), _noise(8, seed=2))
    reader.put(SHA_B, _noise(8, seed=2))  # known: not written twice
    assert len(reader.packs()) == 1


def _fill(root: str, first: int, count: int) -> None:
    cache = PreprocessCache(root, 16)
    for i in range(first, first + count):
        cache.put(f"{i:064x}", _noise(16, seed=i))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_processes_write_their_own_packs_and_forked_children_read_the_parents(
    tmp_path: Path,
) -> None:
    parent = PreprocessCache(tmp_path, 16)
    parent.put(SHA_A, _noise(16, seed=100))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_fill, args=(str(tmp_path), k * 40, 40)) for k in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert 2 <= len(parent.packs()) <= 4  # a writer that finished may hand its pack on
    for i in range(120):
        np.testing.assert_array_equal(parent.get(f"{i:064x}"), _noise(16, seed=i))

    # A forked child reads the parent's records and appends to a pack of its own.
    def child() -> None:
        assert parent.get(SHA_A) is not None
        parent.put(SHA_B, _noise(16, seed=101))

    process = context.Process(target=child)
    before = len(parent.packs())
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert len(parent.packs()) <= before + 1
    np.testing.assert_array_equal(parent.get(SHA_B), _noise(16, seed=101))


def test_a_pack_whose_writer_is_gone_is_taken_over(tmp_path: Path) -> None:
    first = PreprocessCache(tmp_path, 8)
    first.put(SHA_A, _noise(8, seed=1))
    second = PreprocessCache(tmp_path, 8)
    second.put(SHA_B, _noise(8, seed=2))
    assert len(first.packs()) == 2  # both writers alive: a pack each
    del first, second
    gc.collect()  # their files closed: no writer holds either pack
    third = PreprocessCache(tmp_path, 8)
    third.put(SHA_C, _noise(8, seed=3))
    assert len(third.packs()) == 2  # appended to an existing pack
    reader = PreprocessCache(tmp_path, 8)
    for sha, seed in ((SHA_A, 1), (SHA_B, 2), (SHA_C, 3)):
        np.testing.assert_array_equal(reader.get(sha), _noise(8, seed=seed))


def test_sequential_processes_share_one_pack(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    for k in range(4):
        worker = context.Process(target=_fill, args=(str(tmp_path), k * 10, 10))
        worker.start()
        worker.join(timeout=60)
        assert worker.exitcode == 0
    reader = PreprocessCache(tmp_path, 16)
    assert len(reader.packs()) == 1
    for i in range(40):
        np.testing.assert_array_equal(reader.get(f"{i:064x}"), _noise(16, seed=i))


def test_a_taken_over_pack_is_written_over_its_torn_tail(tmp_path: Path) -> None:
    first = PreprocessCache(tmp_path, 8)
    first.put(SHA_A, _noise(8, seed=1))
    [pack] = first.packs()
    del first
    gc.collect()
    with pack.open("ab") as handle:
        handle.write(b"CXRPACK3" + bytes(30))  # a record cut short by a crash
    second = PreprocessCache(tmp_path, 8)
    second.put(SHA_B, _noise(8, seed=2))
    assert second.packs() == [pack]
    assert pack.stat().st_size == 2 * (HEADER + 64)
    reader = PreprocessCache(tmp_path, 8)
    np.testing.assert_array_equal(reader.get(SHA_A), _noise(8, seed=1))
    np.testing.assert_array_equal(reader.get(SHA_B), _noise(8, seed=2))


def test_pickled_cache_is_the_same_cache(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 8, "pad", kind="mask")
    cache.put(SHA_A, _noise(8))
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.root, copy.size, copy.crop, copy.kind) == (tmp_path, 8, "pad", "mask")
    np.testing.assert_array_equal(copy.get(SHA_A), _noise(8))
    copy.put(SHA_B, _noise(8, seed=1))
    assert len(cache.packs()) == 2  # the copy writes a pack of its own


def test_stale_folders_are_the_older_versions(tmp_path: Path) -> None:
    PreprocessCache(tmp_path, 8).put(SHA_A, _noise(8))
    PreprocessCache(tmp_path, 8, kind="mask").put(SHA_A, _noise(8))
    for name in ("v2-224-center", "v1-64-pad-mask", "v2-notes", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "v2-32-center").write_text("a file, not a cache folder", encoding="utf-8")
    assert [p.name for p in stale_folders(tmp_path)] == ["v1-64-pad-mask", "v2-224-center"]
    assert stale_folders(tmp_path / "missing") == []
