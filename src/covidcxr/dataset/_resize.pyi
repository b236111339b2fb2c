"""Type stub of the C extension ``_resize.c`` (Pillow's reduce and BILINEAR resize of
8-bit grey images, to the bit)."""

import numpy as np
from numpy.typing import NDArray

#: 1 where the extension was built with the SSE2 passes (x86-64), else 0.
SIMD: int

def reduce(
    src: bytes | bytearray | memoryview | NDArray[np.uint8],
    width: int,
    height: int,
    out: NDArray[np.uint8] | bytearray | memoryview,
    box: tuple[int, int, int, int],
    xscale: int,
    yscale: int,
) -> None: ...
def resize_bilinear(
    src: bytes | bytearray | memoryview | NDArray[np.uint8],
    width: int,
    height: int,
    out: NDArray[np.uint8] | bytearray | memoryview,
    out_width: int,
    out_height: int,
    box: tuple[float, float, float, float],
    simd: bool = True,
) -> None: ...
