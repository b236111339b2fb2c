"""ML-ready views of the store: tasks, samples, leak-proof splits, torch Dataset, exports.

Everything here except :mod:`covidcxr.dataset.torch` works without torch.
"""
