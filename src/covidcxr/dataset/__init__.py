"""ML-ready views of the store: tasks, samples, leak-proof splits, torch Dataset, exports.

Everything here except :mod:`covidcxr.dataset.torch_dataset` works without torch;
``from covidcxr.dataset import CollectionDataset`` (or ``normalise_batch``) imports torch
only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from covidcxr.dataset.torch_dataset import CollectionDataset, normalise_batch

__all__ = ["CollectionDataset", "normalise_batch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from covidcxr.dataset import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(f"module 'covidcxr.dataset' has no attribute {name!r}")
