"""Progress bars: drawn on a terminal, silent in pipes and CI."""

from __future__ import annotations

import sys

import pytest

from covidcxr import progress


def test_silent_in_a_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress.bar(range(3), "export hf")) == [0, 1, 2]
    with progress.counter("predict", total=2) as advance:
        advance(2)
    progress.step("fold 1/5", "evaluate")
    assert capsys.readouterr().err == "fold 1/5\n"


def test_drawn_on_a_terminal_unless_ci(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert list(progress.bar(range(3), "export hf")) == [0, 1, 2]
    with progress.counter("predict", total=4) as advance:
        advance(4)
    err = capsys.readouterr().err
    assert "export hf" in err and "0/3" in err and "predict" in err and "0/4" in err
    monkeypatch.setenv("CI", "true")
    assert list(progress.bar(range(3), "export hf")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
