"""covidcxr: a toolkit for the public COVID-19 chest imaging data collection.

The public API is ``__all__`` below; the README imports from here. Layers, each
importing only from the ones before it::

    schema, imaging        pure parsing and safe decoding (no database, no torch)
    store                  tables, migrations, blobs, queries (the only SQL)
    ingest, dataset        sources -> store; store -> samples, tasks, splits, Dataset
    models                 network, training, evaluation, prediction, cards
    export, cli            file formats and the command line over all of the above

The core (schema, imaging, store, ingest, dataset without ``CollectionDataset``,
export) needs no torch. Names are imported on first use, so ``import covidcxr`` stays
cheap and ``covidcxr.CollectionDataset`` alone asks for the ``ml`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

RESEARCH_USE_ONLY = "research use only, not a diagnosis"

# Public name -> the module that defines it.
_EXPORTS = {
    "open_store": "covidcxr.store.db",
    "Store": "covidcxr.store.db",
    "RecordFilter": "covidcxr.store.queries",
    "ingest_source": "covidcxr.ingest.pipeline",
    "Selection": "covidcxr.dataset.samples",
    "build_samples": "covidcxr.dataset.samples",
    "get_task": "covidcxr.dataset.tasks",
    "make_split": "covidcxr.dataset.splits",
    "load_split": "covidcxr.dataset.splits",
    "verify_split": "covidcxr.dataset.splits",
    "CollectionDataset": "covidcxr.dataset.torch_dataset",
    "normalise_batch": "covidcxr.dataset.torch_dataset",
    "load_bundle": "covidcxr.models.bundle",
    "predict": "covidcxr.models.engines",
}

__all__ = [
    "RESEARCH_USE_ONLY",
    "CollectionDataset",
    "RecordFilter",
    "Selection",
    "Store",
    "__version__",
    "build_samples",
    "get_task",
    "ingest_source",
    "load_bundle",
    "load_split",
    "make_split",
    "normalise_batch",
    "open_store",
    "predict",
    "verify_split",
]

if TYPE_CHECKING:
    from covidcxr.dataset.samples import Selection, build_samples
    from covidcxr.dataset.splits import load_split, make_split, verify_split
    from covidcxr.dataset.tasks import get_task
    from covidcxr.dataset.torch_dataset import CollectionDataset, normalise_batch
    from covidcxr.ingest.pipeline import ingest_source
    from covidcxr.models.bundle import load_bundle
    from covidcxr.models.engines import predict
    from covidcxr.store.db import Store, open_store
    from covidcxr.store.queries import RecordFilter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'covidcxr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
