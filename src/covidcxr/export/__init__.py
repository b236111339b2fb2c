"""Exports of the store's records to files other tools read.

Formats are a registry (:data:`FORMATS`): a name mapped to an :class:`ExportFormat`
that says which function writes it and which options it takes. The writer is named
as ``"module:function"`` and imported only when that format is used, so that a format
with heavy dependencies costs nothing to the others. Add a format with
:func:`register_format`; the ``covidcxr export`` command offers every registered
format and its options.

Every export is atomic: the writer writes a temporary file next to the target, which
replaces the target only when the writer has finished; on any error the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection

from covidcxr.atomic import atomic_directory, atomic_output
from covidcxr.errors import CovidCxrError
from covidcxr.store.db import Store
from covidcxr.store.queries import RecordFilter, list_records

log = logging.getLogger(__name__)

__all__ = [
    "FINDING_STYLES",
    "FORMATS",
    "UPSTREAM_LAYOUT_NAMES",
    "ExportError",
    "ExportFormat",
    "ExportJob",
    "ExportOption",
    "ExportWriteError",
    "export_records",
    "register_format",
]


class ExportError(CovidCxrError, ValueError):
    """An export was asked for with an unknown format or a bad option."""


class ExportWriteError(CovidCxrError, OSError):
    """The export's output file cannot be written."""


@dataclass(frozen=True)
class ExportOption:
    """An option a format takes.

    Attributes:
        name: the keyword argument of the writer (``--name-with-dashes`` on the CLI).
        choices: the accepted values; the first is the default. ``(False, True)``
            makes a CLI switch.
        help: one line for ``--help``.
        metavar: set for a free-text option (a path, a name): any text is accepted,
            ``choices`` holds at most its default (empty: no default, None).
    """

    name: str
    choices: tuple[str | bool, ...]
    help: str
    metavar: str | None = None

    @property
    def default(self) -> str | bool | None:
        """The value used when the option is not given."""
        return self.choices[0] if self.choices else None


@dataclass(frozen=True)
class ExportJob:
    """What a writer gets besides its output path and options.

    Attributes:
        conn: an open connection, for details beyond the rows (images, annotations).
        rows: the selected records (:func:`covidcxr.store.queries.list_records`), in
            source/line order.
        selection: the filter that selected them (recorded in the output where the
            format has room for it).
        store: the store, when the caller passed one (formats that copy image bytes
            need its blobs); None when only a connection was given.
    """

    conn: Connection
    rows: Sequence[Mapping[str, Any]]
    selection: RecordFilter
    store: Store | None = None


Writer = Callable[..., int]


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: what users type (``--format NAME``).
        writer: ``"module:function"``; the function is called as
            ``function(job, path, **options)`` and returns the number of rows written.
            It writes ``path`` only (a temporary file that is renamed afterwards).
        description: one line for ``--help``.
        suffix: the usual file name suffix.
        options: the options the writer takes.
        directory: the output is a folder (written beside the target and renamed into
            place as a whole) rather than one file.
    """

    name: str
    writer: str
    description: str
    suffix: str
    options: tuple[ExportOption, ...] = ()
    directory: bool = False

    def load_writer(self) -> Writer:
        """Import and return the writer function."""
        module_name, _, function = self.writer.partition(":")
        return cast(Writer, getattr(importlib.import_module(module_name), function))


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> None:
    """Add a format to :data:`FORMATS`.

    Raises:
        ValueError: a format of that name is already registered, or two of its
            options share a name.
    """
    if fmt.name in FORMATS:
        raise ValueError(f"register_format: format {fmt.name!r} is already registered")
    names = [option.name for option in fmt.options]
    if len(set(names)) != len(names):
        raise ValueError(f"register_format: {fmt.name!r} lists an option twice: {names}")
    FORMATS[fmt.name] = fmt


UPSTREAM_LAYOUT_NAMES = ("latest", "june-2020")
FINDING_STYLES = ("as-given", "hierarchical", "flat")

register_format(
    ExportFormat(
        "upstream-csv",
        "covidcxr.export.tables:write_upstream_csv",
        "the upstream metadata.csv layout with the stored, normalised values (ingest "
        "reads them back unchanged): unknown markers (?, Not visible) and out-of-range "
        "values are blank, whitespace is trimmed, extra and overflow columns are left "
        "out (Parquet's extra column has them); the original cell text is in the "
        "source's metadata file at each record's line",
        ".csv",
        (
            ExportOption(
                "layout",
                UPSTREAM_LAYOUT_NAMES,
                "columns: latest (with RT_PCR_positive) or june-2020 (default: latest)",
            ),
            ExportOption(
                "findings",
                FINDING_STYLES,
                "finding column: the text as given, or rewritten from the parsed findings "
                "as paths (hierarchical) or leaf names (flat) (default: as-given)",
            ),
            ExportOption(
                "allow_formulas",
                (False, True),
                "write text that starts like a spreadsheet formula (=, +, -, @) as it is, "
                "instead of prefixing it with '",
            ),
        ),
    )
)
register_format(
    ExportFormat(
        "parquet",
        "covidcxr.export.tables:write_parquet",
        "every listed column with real types, plus image size/format/phash, severity "
        "scores, lung mask/box presence and image_path (the stored image, relative to "
        "the data directory)",
        ".parquet",
    )
)


_ML_OPTIONS = (
    ExportOption(
        "task",
        (),
        "task whose labels to write (default: the split's task, else findings)",
        metavar="TASK",
    ),
    ExportOption(
        "split", (), "split file (covidcxr split): its selection, task and folds", metavar="FILE"
    ),
)
register_format(
    ExportFormat(
        "webdataset",
        "covidcxr.export.ml:write_webdataset",
        "WebDataset tar shards per fold (image + json per sample)",
        "",
        _ML_OPTIONS,
        directory=True,
    )
)
register_format(
    ExportFormat(
        "hf",
        "covidcxr.export.ml:write_hf",
        "Hugging Face imagefolder with metadata.jsonl and a card giving the features "
        "(label = ClassLabel for binary tasks; train/validation/test for holdout splits, "
        "one config per fold otherwise)",
        "",
        _ML_OPTIONS,
        directory=True,
    )
)
register_format(
    ExportFormat(
        "imagefolder",
        "covidcxr.export.ml:write_imagefolder",
        "torchvision ImageFolder: fold/class/image (binary tasks; class folders "
        "0_not_X and 1_X, so class index = label)",
        "",
        _ML_OPTIONS,
        directory=True,
    )
)


def _resolve_options(fmt: ExportFormat, options: Mapping[str, Any]) -> dict[str, Any]:
    known = {option.name: option for option in fmt.options}
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) or "no options"
        raise ExportError(
            f"export: format {fmt.name!r} does not take {', '.join(map(repr, unknown))}; "
            f"it takes: {takes}"
        )
    resolved: dict[str, Any] = {}
    for name, option in known.items():
        value = options.get(name, option.default)
        if option.metavar is not None:
            if value is not None and not isinstance(value, str):
                raise ExportError(f"export: {name} must be text, got {value!r}")
            resolved[name] = value
            continue
        # Types must match too, so that 1 and 0 do not pass for True and False.
        if not any(type(value) is type(choice) and value == choice for choice in option.choices):
            raise ExportError(
                f"export: {name} {value!r} is not valid for {fmt.name!r}; choose one of "
                + ", ".join(map(repr, option.choices))
            )
        resolved[name] = value
    return resolved


def export_records(
    conn_or_store: Connection | Store,
    path: str | os.PathLike[str],
    fmt: str,
    *,
    selection: RecordFilter | None = None,
    **options: Any,
) -> int:
    """Write the records matching ``selection`` to ``path`` in format ``fmt``.

    Args:
        conn_or_store: an open connection, or the store (a connection is opened and
            closed here).
        path: the output file (or folder, for folder formats); its parent folders are
            created. An existing output is replaced, atomically.
        fmt: a name in :data:`FORMATS` (``upstream-csv``, ``parquet``).
        selection: which records (default: all), in source/line order.
        **options: the format's options, e.g. ``layout="june-2020"``,
            ``findings="hierarchical"``, ``allow_formulas=True`` for upstream-csv.

    Returns:
        The number of rows written.

    Raises:
        ExportError: ``fmt`` is not registered, or an option is unknown or invalid.
        ExportWriteError: ``path`` cannot be written (nothing is left behind).
        MetadataError: a filter value is not valid.
    """
    export_format = FORMATS.get(fmt)
    if export_format is None:
        raise ExportError(
            f"export: unknown format {fmt!r}; choose one of: {', '.join(sorted(FORMATS))}"
        )
    resolved = _resolve_options(export_format, options)
    writer = export_format.load_writer()
    selection = selection or RecordFilter()
    target = Path(path)
    output = atomic_directory if export_format.directory else atomic_output
    try:
        with output(target) as temporary, ExitStack() as stack:
            if isinstance(conn_or_store, Store):
                store: Store | None = conn_or_store
                conn = stack.enter_context(conn_or_store.read())
            else:
                store, conn = None, conn_or_store
            rows = list_records(conn, selection)
            job = ExportJob(conn, rows, selection, store)
            written = writer(job, temporary, **resolved)
    except OSError as exc:
        raise ExportWriteError(f"export: cannot write {target}: {exc.strerror or exc}") from exc
    log.info("exported %d rows as %s to %s", written, fmt, target)
    return written
