"""Table output: cut only on a terminal, never in a pipe; control characters escaped."""

from __future__ import annotations

import io

from covidcxr.cli.output import write_mapping, write_rows


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROWS = [{"file": "x" * 70, "n": 1}]


def test_a_pipe_gets_every_value_whole() -> None:
    out = io.StringIO()
    write_rows(ROWS, ["file", "n"], "table", max_width=40, out=out)
    assert "x" * 70 in out.getvalue()
    assert "…" not in out.getvalue()


def test_a_terminal_gets_long_values_cut() -> None:
    out = Terminal()
    write_rows(ROWS, ["file", "n"], "table", max_width=40, out=out)
    assert "x" * 39 + "…" in out.getvalue()
    assert "x" * 40 not in out.getvalue()


def test_control_characters_are_escaped_in_tables_and_mappings() -> None:
    out = io.StringIO()
    write_rows([{"file": "a\x1b[2Jb\nc"}], ["file"], "table", out=out)
    write_mapping({"source\x07": {"k": "v\rw"}}, "table", out=out)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "a\\x1b[2Jb\\nc" in text
    assert "source\\x07:" in text and "k: v\\rw" in text
