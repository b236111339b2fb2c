"""``covidcxr serve`` and ``covidcxr users`` on the command line."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from covidcxr.cli import build_parser


def test_serve_options_parse() -> None:
    args = build_parser().parse_args(
        ["serve", "--port", "9000", "--workers", "2", "--predict-per-minute", "5", "--private"]
    )
    assert (args.port, args.workers, args.predict_per_minute, args.private) == (9000, 2, 5, True)
    assert args.host == "127.0.0.1"


def test_users_add_needs_a_known_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["users", "add", "ann", "--role", "admin"])
    assert exited.value.code == 2
    assert "invalid choice: 'admin'" in capsys.readouterr().err
