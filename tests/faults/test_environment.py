"""Environment errors are one line naming the path and the fix, exit 3, store unchanged."""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_helpers import table_rows

from conftest import MakeCollection, encode, upstream_row, xray_like
from covidcxr.cli import main
from covidcxr.store.blobs import BlobStore


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", [["list"], ["stats"], ["verify"], ["show", "#1"]])
def test_reading_commands_refuse_a_missing_store_and_create_nothing(
    command: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run([*command, "--db", "sqlite:///sub/x.sqlite", "--data-dir", "d"], capsys)
    line = one_line(err)
    assert code == 3
    assert f"no covidcxr store at {tmp_path / 'sub' / 'x.sqlite'}" in line  # absolute
    assert "covidcxr ingest" in line and "--data-dir" in line
    assert list(tmp_path.iterdir()) == []


def test_a_file_without_covidcxr_tables_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    before = path.read_bytes()
    code, _, err = run(["list", "--db", str(path)], capsys)
    assert code == 3 and "holds no covidcxr tables" in one_line(err)
    assert path.read_bytes() == before


def test_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").write_text("not a folder")
    code, _, err = run(["list", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 3 and f"{tmp_path / 'data'} is a file, not a folder" in one_line(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_database_file(
    damage: str,
    make_collection: MakeCollection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "s.sqlite"
    args = ["--db", str(path), "--data-dir", str(tmp_path / "data")]
    assert run(["ingest", str(make_collection()), *args], capsys)[0] == 0
    data = path.read_bytes()
    damaged = b"\x13" * len(data) if damage == "garbage" else data[: len(data) // 3]
    path.write_bytes(damaged)
    for command in (["list"], ["ingest", str(make_collection(name="other"))]):
        code, _, err = run([*command, *args], capsys)
        line = one_line(err)
        assert code == 3 and str(path) in line
        assert "restore it from a backup" in line or "damaged" in line
    assert path.read_bytes() == damaged


def test_read_only_database(
    make_collection: MakeCollection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.sqlite"
    data = ["--data-dir", str(tmp_path / "data")]
    root = make_collection()
    assert run(["ingest", str(root), "--db", str(path), *data], capsys)[0] == 0
    before = table_rows(f"sqlite:///{path}")
    (root / "images" / "p9.png").write_bytes(encode(xray_like(9)))
    rows = [upstream_row(patientid=str(i), filename=f) for i, f in enumerate(["p1.png", "p9.png"])]
    from conftest import write_metadata

    write_metadata(root / "metadata.csv", rows)
    # Opened read-only by SQLite itself: root's permissions cannot get around it.
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    code, _, err = run(["ingest", str(root), "--db", read_only, "--allow-removals", *data], capsys)
    line = one_line(err)
    assert code == 3 and "read-only" in line and "nothing was changed" in line
    assert table_rows(f"sqlite:///{path}") == before


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs root and mount rights; CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs (not root?): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_message_and_the_store_is_unchanged(
    small_fs: Path, make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", str(small_fs / "s.sqlite"), "--data-dir", str(small_fs / "data")]
    assert run(["ingest", str(make_collection()), *args], capsys)[0] == 0
    url = f"sqlite:///{small_fs / 's.sqlite'}"
    before = table_rows(url)
    # Noise does not compress: 40 such images need more than the 1 MB there is.
    rng_rows = [upstream_row(patientid=str(i), filename=f"big{i}.png") for i in range(40)]
    import numpy as np

    rng = np.random.default_rng(0)
    images = {
        f"big{i}.png": encode(rng.integers(0, 255, (200, 180), dtype=np.uint8)) for i in range(40)
    }
    code, _, err = run(
        [
            "ingest",
            str(make_collection(rng_rows, name="big", images=images, annotations=False)),
            *args,
        ],
        capsys,
    )
    line = one_line(err)
    assert code == 3 and "No space left on device" in line and str(small_fs) in line
    assert "free some space" in line
    assert table_rows(url) == before


def test_read_only_file_system(
    small_fs: Path, make_collection: MakeCollection, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", str(small_fs / "s.sqlite"), "--data-dir", str(small_fs / "data")]
    assert run(["ingest", str(make_collection()), *args], capsys)[0] == 0
    url = f"sqlite:///{small_fs / 's.sqlite'}"
    before = table_rows(url)
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=False)
    if remounted.returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    code, _, err = run(["ingest", str(make_collection(name="second")), *args], capsys)
    line = one_line(err)
    assert code == 3 and str(small_fs) in line and "read-only" in line.lower()
    assert table_rows(url) == before
    assert run(["list", *args], capsys)[0] == 0  # reading still works


def test_disk_full_while_copying_blobs(
    make_collection: MakeCollection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["--db", str(tmp_path / "s.sqlite"), "--data-dir", str(tmp_path / "data")]

    def full(self: BlobStore, data: bytes, sha256: str | None = None, **_: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "ab"))

    monkeypatch.setattr(BlobStore, "put", full)
    code, _, err = run(["ingest", str(make_collection()), *args], capsys)
    line = one_line(err)
    assert code == 3 and f"{tmp_path / 'data' / 'blobs' / 'ab'}: No space left" in line
    assert table_rows(f"sqlite:///{tmp_path / 's.sqlite'}")["records"] == []
