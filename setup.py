"""covidcxr's one C extension; everything else about the package is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds, and the training
loader decodes PNGs with libpng instead (``covidcxr.dataset.loading.NATIVE_PNG``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "covidcxr.dataset._pngfilter",
            sources=["src/covidcxr/dataset/_pngfilter.c"],
            optional=True,
        )
    ]
)
