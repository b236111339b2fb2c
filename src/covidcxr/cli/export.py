"""The export command: ``covidcxr export --format FORMAT --out FILE [filters]``.

Formats and their options come from the registry in :mod:`covidcxr.export`, so a
newly registered format shows up here without changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from covidcxr.cli.collection import (
    add_filter_options,
    add_store_options,
    filter_from,
    store_from,
    without_prefix,
)
from covidcxr.export import FORMATS, ExportError, ExportOption, export_records


def _all_options() -> dict[str, ExportOption]:
    """Every option of every format, once (formats sharing a name must agree on it)."""
    options: dict[str, ExportOption] = {}
    for fmt in FORMATS.values():
        for option in fmt.options:
            known = options.setdefault(option.name, option)
            if known.choices != option.choices:  # pragma: no cover - a registry mistake
                raise AssertionError(f"export option {option.name!r} differs between formats")
    return options


def _formats_taking(name: str) -> str:
    return ", ".join(fmt.name for fmt in FORMATS.values() if name in {o.name for o in fmt.options})


def cmd_export(args: argparse.Namespace) -> int:
    """covidcxr export."""
    options = {
        name: getattr(args, name)
        for name in _all_options()
        if getattr(args, name, None) is not None
    }
    with store_from(args) as store:
        with store.read() as conn:
            selection = filter_from(args, conn)
        try:
            written = export_records(store, args.out, args.format, selection=selection, **options)
        except ExportError as exc:
            raise ExportError(without_prefix(str(exc))) from None
    print(f"wrote {written} rows to {args.out}")
    return 0


def register(subparsers: Any) -> None:
    """Add the export command."""
    formats = "; ".join(f"{fmt.name}: {fmt.description}" for fmt in FORMATS.values())
    parser = subparsers.add_parser(
        "export",
        help="write the (filtered) records to a file: " + ", ".join(FORMATS),
        description=f"Write the records matching the filters to one file. Formats: {formats}. "
        "The file is replaced atomically: an error leaves nothing half-written.",
    )
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="output format")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="output file (a folder for webdataset, hf and imagefolder)",
    )
    group = parser.add_argument_group("format options")
    for name, option in _all_options().items():
        flag = "--" + name.replace("_", "-")
        takes = f" [{_formats_taking(name)}]"
        if option.metavar is not None:
            group.add_argument(flag, dest=name, metavar=option.metavar, help=option.help + takes)
        elif option.choices == (False, True):
            group.add_argument(
                flag, dest=name, action="store_const", const=True, help=option.help + takes
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                choices=option.choices,
                help=option.help + takes,
            )
    add_filter_options(parser)
    add_store_options(parser)
    parser.set_defaults(handler=cmd_export)
