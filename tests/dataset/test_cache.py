"""The preprocessed-pixel cache: one .npy per record, written atomically; damage; writers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pytest

from covidcxr.dataset import cache as cache_module
from covidcxr.dataset.cache import CACHE_VERSION, PreprocessCache, stale_folders

SHA_A = "a" * 64
SHA_B = "b" * 64


def _noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


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
    assert [p.name for p in cache.folder.iterdir()] == [f"{SHA_A}.npy"]  # no temporary left
    np.testing.assert_array_equal(np.load(cache.path(SHA_A)), first)  # a plain .npy file


def test_key_has_size_crop_kind_and_pillow_version(tmp_path: Path) -> None:
    folders = {
        PreprocessCache(tmp_path, 24).folder,
        PreprocessCache(tmp_path, 32).folder,
        PreprocessCache(tmp_path, 24, "pad").folder,
        PreprocessCache(tmp_path, 24, kind="mask").folder,
    }
    assert len(folders) == 4
    assert PIL.__version__ in CACHE_VERSION  # a Pillow upgrade starts a new cache
    small = PreprocessCache(tmp_path, 24)
    small.put(SHA_A, _noise(24))
    assert small.get(SHA_B) is None
    assert PreprocessCache(tmp_path, 32).get(SHA_A) is None
    assert PreprocessCache(tmp_path, 24, kind="mask").get(SHA_A) is None


def test_repr_and_folder(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 16, "pad", kind="mask")
    assert cache.folder == tmp_path / f"v{CACHE_VERSION}-16-pad-mask"
    assert str(cache.folder) in repr(cache)
    assert cache.get(SHA_A) is None
    assert not cache.folder.exists()  # reading creates nothing


def test_refuses_bad_keys_pixels_and_requests(tmp_path: Path) -> None:
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
    with pytest.raises(ValueError, match="positive int"):
        PreprocessCache(tmp_path, 0)
    with pytest.raises(ValueError, match="crop 'middle'"):
        PreprocessCache(tmp_path, 8, "middle")  # type: ignore[arg-type]
    assert not cache.folder.exists()


# -- damage and failures ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["torn", "empty", "garbage", "other size", "other dtype"])
def test_damaged_record_is_reported_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache = PreprocessCache(tmp_path, 8)
    cache.put(SHA_A, _noise(8))
    path = cache.path(SHA_A)
    data = path.read_bytes()
    if damage == "torn":
        path.write_bytes(data[: len(data) - 10])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file" * 10)
    elif damage == "other size":
        np.save(path, _noise(9))
    else:
        np.save(path, _noise(8).astype(np.uint16))
    with caplog.at_level(logging.WARNING, logger="covidcxr.dataset.cache"):
        assert cache.get(SHA_A) is None
    assert "rebuilding it" in caplog.text
    np.testing.assert_array_equal(cache.get_or_load(SHA_A, lambda: _noise(8, 5)), _noise(8, 5))
    np.testing.assert_array_equal(cache.get(SHA_A), _noise(8, 5))


def test_a_failed_write_leaves_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies mid-write (here: np.save fails) leaves neither a record nor
    its temporary file; the record is written whole next time."""
    cache = PreprocessCache(tmp_path, 8)

    def broken(handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"\x93NUMPY half a record")
        raise OSError("No space left on device")

    monkeypatch.setattr(cache_module.np, "save", broken)
    cache.put(SHA_A, _noise(8))
    assert cache.get(SHA_A) is None
    assert list(cache.folder.iterdir()) == []
    monkeypatch.undo()
    cache.put(SHA_A, _noise(8))
    np.testing.assert_array_equal(cache.get(SHA_A), _noise(8))


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
    assert cache.get(SHA_A) is None
    cache.put(SHA_B, _noise(8, seed=2))
    np.testing.assert_array_equal(PreprocessCache(tmp_path / "cache", 8).get(SHA_B), _noise(8, 2))


# -- several writers --------------------------------------------------------------------


def test_concurrent_threads_write_and_read_whole_records(tmp_path: Path) -> None:
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
    assert sorted(p.name for p in cache.folder.iterdir()) == [f"{SHA_A}.npy", f"{SHA_B}.npy"]


def _fill(root: str, count: int) -> None:
    cache = PreprocessCache(root, 16)
    for i in range(count):  # every process writes the same keys: they race on each
        cache.put(f"{i:064x}", _noise(16, seed=i))
        assert cache.get(f"{i:064x}") is not None


def test_processes_fill_one_cache_at_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn" if not hasattr(os, "fork") else "fork")
    workers = [context.Process(target=_fill, args=(str(tmp_path), 60)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    reader = PreprocessCache(tmp_path, 16)
    for i in range(60):
        np.testing.assert_array_equal(reader.get(f"{i:064x}"), _noise(16, seed=i))
    assert len(list(reader.folder.iterdir())) == 60  # records only, no temporaries


def test_pickled_cache_is_the_same_cache(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path, 8, "pad", kind="mask")
    cache.put(SHA_A, _noise(8))
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.root, copy.size, copy.crop, copy.kind) == (tmp_path, 8, "pad", "mask")
    np.testing.assert_array_equal(copy.get(SHA_A), _noise(8))
    copy.put(SHA_B, _noise(8, seed=1))
    np.testing.assert_array_equal(cache.get(SHA_B), _noise(8, seed=1))


def test_stale_folders_are_the_other_versions(tmp_path: Path) -> None:
    PreprocessCache(tmp_path, 8).put(SHA_A, _noise(8))
    PreprocessCache(tmp_path, 8, kind="mask").put(SHA_A, _noise(8))
    names = ("v3-224-center", "v1-64-pad-mask", "v4-pillow1.0-224-center", "v2-notes", "other")
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "v2-32-center").write_text("a file, not a cache folder", encoding="utf-8")
    assert [p.name for p in stale_folders(tmp_path)] == [
        "v1-64-pad-mask",
        "v3-224-center",
        "v4-pillow1.0-224-center",
    ]
    assert stale_folders(tmp_path / "missing") == []
