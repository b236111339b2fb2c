"""Image decoding and perceptual hashing.

* :mod:`covidcxr.imaging.decode`: safe decoding of untrusted PNG/JPEG bytes
  (:func:`decode_image`, :func:`read_image_file`), format sniffing, grayscale.
* :mod:`covidcxr.imaging.hashing`: perceptual hashes for near-duplicate detection
  (:func:`image_hashes`, :func:`hamming`).
"""

from covidcxr.imaging.decode import (
    DEFAULT_ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageInfo,
    decode_image,
    extension_matches,
    read_image_file,
    sniff_format,
    to_grayscale,
)
from covidcxr.imaging.hashing import (
    ImageHashes,
    hamming,
    image_hashes,
    phash,
    trim_borders,
)

__all__ = [
    "DEFAULT_ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageHashes",
    "ImageInfo",
    "decode_image",
    "extension_matches",
    "hamming",
    "image_hashes",
    "phash",
    "read_image_file",
    "sniff_format",
    "to_grayscale",
    "trim_borders",
]
