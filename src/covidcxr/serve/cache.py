"""A small cache of encoded answers read from the store, keyed by the request and the
store's data generation (which changes with every ingest, accepted cases included).

The generation is read from the database at most every ``max_age_s`` seconds, so a
cached page is answered without a database round trip; a write made through this
process forgets it at once, another process's write is seen within ``max_age_s``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class AnswerCache:
    """Least-recently-used cache of bytes, at most ``size`` entries (thread-safe)."""

    def __init__(self, size: int = 256, max_age_s: float = 0.5) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._generation: tuple[int, float] | None = None

    def fresh_generation(self) -> int | None:
        """The data generation last read, if read less than ``max_age_s`` ago."""
        known = self._generation
        if known is None or time.monotonic() - known[1] > self.max_age_s:
            return None
        return known[0]

    def note_generation(self, generation: int) -> None:
        """Remember the data generation just read from the database."""
        self._generation = (generation, time.monotonic())

    def forget_generation(self) -> None:
        """The data changed here: read the generation again before the next answer."""
        self._generation = None

    def peek(self, key: Hashable) -> bytes | None:
        """The cached answer for ``key``, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """The cached answer for ``key``, or ``make()``'s (then kept)."""
        value = self.peek(key)
        if value is not None:
            return value
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value
