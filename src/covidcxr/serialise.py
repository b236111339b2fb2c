"""One way to turn the package's frozen dataclasses into JSON-ready dicts and back, and
one way to read a JSON object from a file.

``to_dict(obj)`` gives plain JSON types: tuples become lists, ``NaN`` and infinities
become ``None``, nested dataclasses become dicts. ``from_dict(cls, data)`` reverses it
from the field types: lists become tuples, ``None`` in a ``float`` field becomes
``NaN``, nested dicts become their dataclasses. Keys a newer version wrote and this one
does not know are ignored; missing keys take the field's default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from covidcxr.errors import MetadataError

T = TypeVar("T")

__all__ = ["from_dict", "read_json_object", "to_dict"]


def read_json_object(path: str | Path, caller: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        MetadataError: naming ``caller`` and the file: it cannot be read, is not JSON,
            or holds something other than an object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{caller}: cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise MetadataError(
            f"{caller}: {str(path)!r} holds {type(data).__name__}, not a JSON object"
        )
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a JSON-ready dict (see the module docstring)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict: expected a dataclass instance, got {type(obj).__name__}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list | frozenset | set):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """The dataclass ``cls`` rebuilt from :func:`to_dict`'s output."""
    hints = typing.get_type_hints(cls)
    values = {
        f.name: _typed(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.name in data
    }
    return cls(**values)


def _typed(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if hint is float:
        return math.nan if value is None else float(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if origin is tuple:
        item = args[0] if args else Any
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) <= 1:
            return tuple(_typed(item, v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value, strict=True))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _typed(value_hint, v) for k, v in value.items()}
    return value
