"""The one dataclass <-> JSON helper."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from covidcxr.serialise import from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    value: float
    note: str | None = None


@dataclass(frozen=True)
class Outer:
    name: str
    items: tuple[Inner, ...] = ()
    by_key: Mapping[str, Inner] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    optional: Inner | None = None
    scores: tuple[float, ...] = ()


def test_round_trip_through_json_keeps_every_value() -> None:
    outer = Outer(
        name="x",
        items=(Inner(0.5), Inner(math.nan, "one class")),
        by_key={"auc": Inner(0.8)},
        pair=(3, "a"),
        optional=Inner(1.0),
        scores=(1.0, math.inf),
    )
    data = json.loads(json.dumps(to_dict(outer), allow_nan=False))
    assert data["items"][1] == {"value": None, "note": "one class"}
    assert data["scores"] == [1.0, None]
    back = from_dict(Outer, data)
    assert back.items[0] == Inner(0.5)
    assert math.isnan(back.items[1].value) and back.items[1].note == "one class"
    assert back.by_key == {"auc": Inner(0.8)}
    assert back.pair == (3, "a") and back.optional == Inner(1.0)
    assert back.scores[0] == 1.0 and math.isnan(back.scores[1])


def test_unknown_keys_are_ignored_and_missing_ones_take_defaults() -> None:
    assert from_dict(Outer, {"name": "y", "added_later": 1}) == Outer(name="y")


def test_to_dict_refuses_what_is_not_a_dataclass_instance() -> None:
    with pytest.raises(TypeError, match="expected a dataclass instance"):
        to_dict(Outer)
