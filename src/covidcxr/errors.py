"""The error hierarchy: every error covidcxr raises derives from :class:`CovidCxrError`.

Each class also inherits the matching built-in, so that callers who catch
``ValueError`` or ``OSError`` keep working.
"""

from __future__ import annotations


class CovidCxrError(Exception):
    """Base class of every error raised by covidcxr."""


class MetadataError(CovidCxrError, ValueError):
    """A metadata file, row or value cannot be used."""


class MappingError(CovidCxrError, ValueError):
    """A column/value mapping file is malformed."""


class ImageError(CovidCxrError, ValueError):
    """Image bytes are unsafe or cannot be decoded.

    Attributes:
        code: a short machine-readable reason (``empty_file``, ``unsupported_format``,
            ``truncated``, ``too_many_pixels``, ``undecodable``, ...), used as the
            issue code in validation reports.
    """

    def __init__(self, message: str, code: str = "undecodable") -> None:
        super().__init__(message)
        self.code = code


class StoreError(CovidCxrError, RuntimeError):
    """The database or blob store is unusable or inconsistent."""


class IngestRefusedError(CovidCxrError, RuntimeError):
    """A strict ingest met invalid input and wrote nothing.

    Attributes:
        report: the validation report that caused the refusal.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class MissingExtraError(CovidCxrError, ImportError):
    """An optional dependency is not installed; the message names the extra, or each of
    several extras any one of which would do (``extra`` is then the first)."""

    def __init__(self, package: str, extra: str | tuple[str, ...]) -> None:
        extras = (extra,) if isinstance(extra, str) else extra
        choices = " or ".join(f"'covidcxr[{name}]'" for name in extras)
        super().__init__(f"{package} is not installed: pip install {choices}")
        self.package = package
        self.extra = extras[0]
        self.extras = extras
