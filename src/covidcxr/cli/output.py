"""Command-line output: argparse types, and the row formatter of :mod:`covidcxr.tabular`
(re-exported here for the commands)."""

from __future__ import annotations

import argparse

from covidcxr.tabular import FORMATS, cell_text, escape_text, write_mapping, write_rows

__all__ = ["FORMATS", "cell_text", "escape_text", "positive_int", "write_mapping", "write_rows"]


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value
