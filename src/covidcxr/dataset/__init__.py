"""ML-ready views of the store: tasks, samples, leak-proof splits, torch Dataset, exports.

Everything here except :mod:`covidcxr.dataset.torch_dataset` works without torch;
``from covidcxr.dataset import CollectionDataset`` imports torch only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from covidcxr.dataset.torch_dataset import CollectionDataset

__all__ = ["CollectionDataset"]


def __getattr__(name: str) -> Any:
    if name == "CollectionDataset":
        from covidcxr.dataset.torch_dataset import CollectionDataset

        return CollectionDataset
    raise AttributeError(f"module 'covidcxr.dataset' has no attribute {name!r}")
