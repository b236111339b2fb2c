"""The error for a missing optional dependency names the extra (or extras) to install."""

from __future__ import annotations

import pytest

from covidcxr.errors import MissingExtraError


def test_one_extra_is_named_in_the_message() -> None:
    error = MissingExtraError("torch", "ml")
    assert str(error) == "torch is not installed: pip install 'covidcxr[ml]'"
    assert (error.package, error.extra, error.extras) == ("torch", "ml", ("ml",))
    assert isinstance(error, ImportError)


def test_any_of_several_extras_are_named_in_order() -> None:
    error = MissingExtraError("torch or onnxruntime", ("runtime", "ml"))
    assert str(error) == (
        "torch or onnxruntime is not installed: pip install 'covidcxr[runtime]' or 'covidcxr[ml]'"
    )
    assert error.extra == "runtime"
    with pytest.raises(ImportError, match=r"covidcxr\[runtime\]' or 'covidcxr\[ml\]"):
        raise error
