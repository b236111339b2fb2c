"""Type stub of the C extension ``_pngfilter.c`` (PNG scanline reconstruction)."""

import numpy as np
from numpy.typing import NDArray

#: 1 where the extension was built with the SSE2 paths (x86-64), else 0.
SIMD: int

def unfilter(
    filtered: bytes | bytearray | memoryview | NDArray[np.uint8],
    out: NDArray[np.uint8] | bytearray | memoryview,
    height: int,
    rowbytes: int,
    bpp: int,
    simd: bool = True,
    grey: bool = False,
) -> None: ...
