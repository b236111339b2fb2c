"""Progress bars for long loops: drawn on a terminal (stderr), silent in pipes and CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

_Item = TypeVar("_Item")


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and ``CI`` is not set."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(items: Iterable[_Item], what: str, total: int | None = None) -> Iterator[_Item]:
    """``items``, drawing a bar labelled ``what`` while they are consumed.

    Args:
        items: what to loop over.
        what: the label (``"export hf"``).
        total: the number of items when ``items`` has no ``len``.
    """
    if not enabled():
        yield from items
        return
    yield from tqdm(items, desc=what, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextmanager
def counter(what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A callback that advances a bar by ``n`` (for code that reports progress itself)."""
    if not enabled():
        yield lambda n: None
        return
    with tqdm(desc=what, total=total, leave=False, file=sys.stderr, dynamic_ncols=True) as shown:

        def advance(n: int) -> None:
            shown.update(n)

        yield advance


def note(line: str) -> None:
    """Print a log line to stderr, above any bar being drawn."""
    if enabled():
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


_STEPS: dict[str, tqdm[Any]] = {}


def step(line: str, what: str) -> None:
    """Print ``line`` (:func:`note`) and count one more step of ``what`` on its bar.

    For a command whose steps are only known as they come (``evaluate``): the bar
    shows the steps done and the time spent.
    """
    note(line)
    if not enabled():
        return
    if what not in _STEPS:
        _STEPS[what] = tqdm(desc=what, unit="step", leave=False, file=sys.stderr)
    _STEPS[what].update(1)
