"""covidcxr: a toolkit for the public COVID-19 chest imaging data collection.

The core (``covidcxr.schema``, ``covidcxr.imaging``, ``covidcxr.store``,
``covidcxr.ingest``) needs no torch; the ML layers import it where they use it.
"""

__version__ = "0.1.0"

RESEARCH_USE_ONLY = "research use only, not a diagnosis"

__all__ = ["RESEARCH_USE_ONLY", "__version__"]
