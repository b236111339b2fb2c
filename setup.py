"""covidcxr's two C extensions; everything else about the package is in pyproject.toml.

Both are ``optional=True``: without a C compiler the install still succeeds, and the
training loader decodes PNGs with libpng (``covidcxr.dataset.loading.NATIVE_PNG``) and
resizes with Pillow (``NATIVE_RESIZE``) instead, to the same pixels.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "covidcxr.dataset._pngfilter",
            sources=["src/covidcxr/dataset/_pngfilter.c"],
            optional=True,
        ),
        Extension(
            "covidcxr.dataset._resize",
            sources=["src/covidcxr/dataset/_resize.c"],
            optional=True,
        ),
    ]
)
