"""Collection commands: ingest, check, list, show, stats."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from covidcxr.cli.output import FORMATS, cell_text, positive_int, write_mapping, write_rows
from covidcxr.errors import IngestRefusedError, MappingError, MetadataError
from covidcxr.ingest.mapping import SourceMapping, load_mapping, load_preset, preset_names
from covidcxr.ingest.report import Issue, Report, escape_control
from covidcxr.ingest.writer import RemovalsRefusedError
from covidcxr.schema.findings import resolve_node
from covidcxr.schema.values import Severity
from covidcxr.store import queries
from covidcxr.store.db import Store, open_store

LIST_TABLE_COLUMNS = (
    "record_id",
    "source",
    "patient_id",
    "filename",
    "image_status",
    "view",
    "modality",
    "finding",
    "sex",
    "age_years",
    "offset_days",
    "flags",
)


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """``--db`` and ``--data-dir``, shared by every command that opens the store."""
    parser.add_argument(
        "--db",
        metavar="URL",
        help="database URL (sqlite:///file, postgresql://...) or SQLite path; "
        "default: $COVIDCXR_DB or covidcxr.sqlite in the data directory",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where blobs and reports live; default: $COVIDCXR_DATA_DIR or the user data directory",
    )


def store_from(args: argparse.Namespace, create: bool = False) -> Store:
    """Open the store named by ``--db``/``--data-dir``; only ``create`` makes a new one."""
    return open_store(args.db, args.data_dir, create=create)


def mapping_from(args: argparse.Namespace) -> SourceMapping | None:
    """The mapping named by ``--mapping FILE`` or ``--preset NAME``, or None.

    Raises:
        MappingError: both are given, or the file is not a valid mapping.
    """
    if args.mapping and args.preset:
        raise MappingError("give --mapping or --preset, not both")
    if args.preset:
        return load_preset(args.preset)
    return load_mapping(args.mapping) if args.mapping else None


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options naming a source: path, metadata file, mapping, name, workers."""
    parser.add_argument(
        "path", help="source folder (metadata.csv, images/, annotations/) or its metadata CSV"
    )
    parser.add_argument(
        "--metadata",
        metavar="FILE",
        help="another metadata file of the source, e.g. metadata-latest.csv",
    )
    parser.add_argument(
        "--mapping", metavar="TOML", help="mapping file for a source with other columns or values"
    )
    parser.add_argument(
        "--preset",
        choices=preset_names(),
        help="built-in mapping for a big public set (instead of --mapping)",
    )
    parser.add_argument("--name", help="source name in the store (default: folder name)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes for decoding images (default: one per CPU)",
    )


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """The record filters shared by list, stats and export."""
    group = parser.add_argument_group("filters (repeat an option to allow several values)")
    group.add_argument(
        "--finding",
        action="append",
        default=[],
        metavar="NODE",
        help="finding at any level: COVID-19, viral, Pneumonia/Bacterial, ...",
    )
    group.add_argument(
        "--view",
        action="append",
        default=[],
        help="PA, AP, AP Supine, AP Erect, L, Axial, Coronal, or frontal",
    )
    group.add_argument("--modality", action="append", default=[], help="X-ray or CT")
    group.add_argument("--sex", action="append", default=[], help="M or F")
    group.add_argument("--age-min", type=float, metavar="YEARS")
    group.add_argument("--age-max", type=float, metavar="YEARS")
    group.add_argument("--source", action="append", default=[], metavar="NAME")
    group.add_argument("--patient", action="append", default=[], metavar="ID")
    group.add_argument(
        "--image-status", action="append", default=[], choices=("stored", "missing", "rejected")
    )
    for name, what in (
        ("severity", "severity scores"),
        ("mask", "a lung mask"),
        ("box", "lung boxes"),
    ):
        group.add_argument(
            f"--has-{name}",
            dest=f"has_{name}",
            action="store_const",
            const=True,
            help=f"only images with {what}",
        )
        group.add_argument(
            f"--no-{name}",
            dest=f"has_{name}",
            action="store_const",
            const=False,
            help=f"only images without {what}",
        )
    for name in queries.OUTCOME_FIELDS:
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=f"outcome_{name}", metavar="Y|N|unknown"
        )
    group.add_argument(
        "--flag",
        action="append",
        default=[],
        choices=queries.RECORD_FLAGS,
        help="record flag that must be set",
    )


def without_prefix(message: str) -> str:
    """A library message without its leading ``function_name:`` (for people)."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.replace("_", "").replace(".", "").isalnum() else message


def cut_value(text: str, limit: int = 80) -> str:
    """``text``, or its first ``limit`` characters, an ellipsis and its length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def issue_line(issue: Issue, limit: int = 80) -> str:
    """One validation issue on a line, long values cut (the report keeps them whole)."""
    value = f" value {cut_value(issue.value, limit)!r}" if issue.value else ""
    message = issue.message
    if issue.value and len(issue.value) > limit:
        message = message.replace(issue.value, f"{issue.value[:limit]}…")
    message = re.sub(rf"'([^']{{{limit}}})[^']+'", lambda m: f"'{m.group(1)}…'", message)
    return f"{issue.severity}: {issue.location()}{value}: {message} ({issue.code})"


def filter_from(args: argparse.Namespace, conn: Connection | None = None) -> queries.RecordFilter:
    """Build a :class:`RecordFilter` from parsed filter options.

    Args:
        args: the parsed options.
        conn: the store; when given, ``--source`` names are checked against its sources
            (a name the store lacks is refused with the known ones, not read as "none").

    Raises:
        MetadataError: a finding, or a source name, that is not known.
    """
    if conn is not None:
        queries.check_choices(args.source, queries.source_names(conn), "source")
    outcomes = {
        name: queries.parse_outcome(getattr(args, f"outcome_{name}"))
        for name in queries.OUTCOME_FIELDS
        if getattr(args, f"outcome_{name}") is not None
    }
    for finding in args.finding:
        try:
            resolve_node(finding)
        except MetadataError as exc:
            raise MetadataError(f"--finding {finding!r}: {without_prefix(str(exc))}") from None
    return queries.RecordFilter(
        findings=args.finding,
        views=args.view,
        modalities=args.modality,
        sexes=args.sex,
        age_min=args.age_min,
        age_max=args.age_max,
        sources=args.source,
        patients=args.patient,
        image_status=args.image_status,
        has_severity=args.has_severity,
        has_mask=args.has_mask,
        has_box=args.has_box,
        outcomes=outcomes,
        flags=args.flag,
    )


def _print_report_summary(report: Report, *, show: int, out: Any) -> None:
    counts = report.counts
    out.write(
        f"  rows {counts.get('rows', 0)}, rejected {counts.get('rows_rejected', 0)}; "
        f"records {counts.get('records', 0)}; patients {counts.get('patients', 0)}\n"
        f"  images referenced {counts.get('images_referenced', 0)}: "
        f"stored {counts.get('images_stored', 0)}, missing {counts.get('images_missing', 0)}, "
        f"rejected {counts.get('images_rejected', 0)}; "
        f"unreferenced files {counts.get('images_unreferenced', 0)}\n"
        f"  annotations: severity {counts.get('annotations_severity', 0)}, "
        f"lung masks {counts.get('annotations_lung_mask', 0)}, "
        f"lung boxes {counts.get('annotations_lung_box', 0)}\n"
    )
    for severity in Severity:
        by_code = report.by_code(severity)
        total = sum(by_code.values())
        detail = ", ".join(f"{code} {n}" for code, n in by_code.most_common())
        out.write(f"  {severity}s {total}" + (f": {detail}" if detail else "") + "\n")
    shown = [i for i in report.issues if i.severity is not Severity.INFO][:show]
    if shown:
        out.write(f"  first {len(shown)} errors/warnings:\n")
        for issue in shown:
            out.write(f"    {issue_line(issue)}\n")


def cmd_ingest(args: argparse.Namespace) -> int:
    """covidcxr ingest: exit 1 when refused (``--strict`` errors, unallowed removals)."""
    from covidcxr.ingest.pipeline import ingest_source

    mapping = mapping_from(args)
    with store_from(args, create=not args.dry_run) as store, _progress_bar() as progress:
        try:
            outcome = ingest_source(
                args.path,
                store,
                metadata=args.metadata,
                mapping=mapping,
                name=args.name,
                strict=args.strict,
                workers=args.workers,
                report_dir=args.report_dir,
                allow_removals=args.allow_removals,
                dry_run=args.dry_run,
                progress=progress,
            )
        except IngestRefusedError as exc:
            print(f"covidcxr ingest: refused: {escape_control(str(exc))}", file=sys.stderr)
            if isinstance(exc.report, Report):
                _print_report_summary(exc.report, show=args.show, out=sys.stderr)
            if isinstance(exc, RemovalsRefusedError):
                sys.stderr.write(_store_counts("would change", exc.counts))
            return 1
        spec, counts = outcome.scan.spec, outcome.summary.counts
        out = sys.stdout
        verb = "would ingest (dry run, nothing written)" if args.dry_run else "ingested"
        out.write(escape_control(f"{verb} {spec.name} ({spec.metadata}) into {store.url}") + "\n")
        _print_report_summary(outcome.scan.report, show=args.show, out=out)
        out.write(_store_counts("would change" if args.dry_run else "store", counts))
        if not outcome.summary.changed:
            out.write("  nothing changed (this input was already ingested)\n")
        out.write(f"  report: {outcome.report_json} and {outcome.report_csv.name}\n")
    return 0


def _store_counts(label: str, counts: dict[str, int]) -> str:
    repaired = counts.get("blobs_repaired", 0)
    return (
        f"  {label}: records added {counts['records_added']}, updated "
        f"{counts['records_updated']}, removed {counts['records_removed']}, unchanged "
        f"{counts['records_unchanged']}; images added {counts['images_added']}; "
        f"annotations added {counts['annotations_added']}, removed "
        f"{counts['annotations_removed']}"
        + (f"; damaged blobs repaired {repaired}" if repaired else "")
        + "\n"
    )


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None] | None]:
    """A tqdm bar per ingest phase on a terminal; None (no output) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # an optional nicety: no bar without it
        yield None
        return

    bars: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = bars[phase] = tqdm(total=total, desc=phase, unit="", leave=False)
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def cmd_check(args: argparse.Namespace) -> int:
    """covidcxr check: validate without writing; exit 1 when the check fails."""
    from covidcxr.ingest.pipeline import check_source

    mapping = mapping_from(args)
    with _progress_bar() as progress:
        scan = check_source(
            args.path,
            metadata=args.metadata,
            mapping=mapping,
            name=args.name,
            workers=args.workers,
            progress=progress,
        )
    report = scan.report
    if args.format == "json":
        write_mapping(report.as_dict(), "json")
    elif args.format == "csv":
        sys.stdout.write(report.to_csv_text())
    else:
        print(escape_control(f"checked {scan.spec.name} ({scan.spec.metadata})"))
        _print_report_summary(report, show=args.show, out=sys.stdout)
    if args.report:
        stem = Path(args.report)
        json_path, csv_path = report.write(stem.parent, stem.name)
        print(f"report written: {json_path}, {csv_path}", file=sys.stderr)
    failing = report.errors + (report.warnings if args.fail_on == "warning" else [])
    if args.fail_on == "never" or not failing:
        if args.format == "table":
            print("check passed")
        return 0
    if args.format == "table":
        print(f"check failed: {len(failing)} issue(s) at or above {args.fail_on}")
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    """covidcxr list."""
    with store_from(args) as store, store.read() as conn:
        rows = queries.list_records(conn, filter_from(args, conn), limit=args.limit)
        empty = not rows and queries.count_records(conn) == 0
    write_rows(
        rows,
        queries.LIST_COLUMNS,
        args.format,
        table_columns=LIST_TABLE_COLUMNS,
        max_width=sys.maxsize if args.wide else 40,
    )
    if args.format == "table":
        print(f"{len(rows)} record(s)", file=sys.stderr)
    if empty:
        _say_empty("list", store)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """covidcxr show: every record of an image or a patient, with image and annotations."""
    with store_from(args) as store, store.read() as conn:
        try:
            rows = queries.find_records(conn, args.key)
        except MetadataError as exc:
            raise MetadataError(without_prefix(str(exc))) from None
        shas = [r["image_sha256"] for r in rows if r["image_sha256"]]
        images = queries.image_details(conn, shas)
        annotations = queries.annotations_for(conn, shas)
        blob_paths = {sha: str(store.blobs.path(sha)) for sha in shas}
    shown = []
    for row in rows:
        sha = row["image_sha256"]
        item = {k: v for k, v in row.items() if v not in (None, [], "")}
        if sha:
            item["image"] = {**images.get(sha, {}), "path": blob_paths[sha]}
            item["annotations"] = annotations.get(sha, [])
        shown.append(item)
    if args.format == "json":
        write_mapping({"records": shown}, "json")
        return 0
    patients = sorted({(item["source"], item["patient_id"]) for item in shown})
    if len({source for source, _ in patients}) > 1:
        names = ", ".join(f"{source}:{patient}" for source, patient in patients)
        print(
            f"{args.key!r} matches {len(patients)} patients of different sources: {names} "
            "(give SOURCE:PATIENT to see one)\n"
        )
    for source, patient in patients:
        items = [i for i in shown if (i["source"], i["patient_id"]) == (source, patient)]
        _print_patient(source, patient, items)
    return 0


def _print_patient(source: str, patient: str, items: list[dict[str, Any]]) -> None:
    """A patient's summary line block, then each record with its image and annotations."""
    print(f"== patient {source}:{patient}: {len(items)} record(s)")
    summary = {
        key: sorted({cell_text(i[key]) for i in items if key in i})
        for key in ("sex", "age_years", "finding", "view", "location", *queries.OUTCOME_FIELDS)
    }
    write_mapping({k: ", ".join(v) for k, v in summary.items() if v}, "table")
    print()
    for item in items:
        where = f"{item.get('folder', '')}/{item['filename']}"
        print(f"-- record #{item['record_id']}  {source}:{patient}  {where}")
        notes = item.pop("annotations", [])
        write_mapping(
            {k: v for k, v in item.items() if k not in ("record_id", "source", "patient_id")},
            "table",
        )
        for line in annotation_lines(notes):
            print(line)
        print()


def annotation_lines(annotations: list[dict[str, Any]]) -> list[str]:
    """Annotations as readable lines: kind, annotator, values, file."""
    if not annotations:
        return ["annotations: none"]
    lines = ["annotations:"]
    for note in annotations:
        skipped = ("kind", "annotator", "label", "file")
        values = ", ".join(
            f"{k} {cell_text(v)}" for k, v in note.items() if k not in skipped and v != ""
        )
        label = f" {note['label']}" if note.get("label") else ""
        lines.append(
            f"  {note['kind']}{label} by {note.get('annotator', '?')}: {values} "
            f"(from {note.get('file', '?')})"
        )
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    """covidcxr stats."""
    with store_from(args) as store, store.read() as conn:
        data = queries.stats(conn, filter_from(args, conn))
        empty = data["records"] == 0 and queries.count_records(conn) == 0
    write_mapping(data, args.format)
    if empty:
        _say_empty("stats", store)
    return 0


def _say_empty(command: str, store: Store) -> None:
    print(
        f"covidcxr {command}: the store {store.url} is empty; fill it with "
        "`covidcxr ingest SOURCE`, or run `covidcxr info` to see which store is in use",
        file=sys.stderr,
    )


def cmd_duplicates(args: argparse.Namespace) -> int:
    """covidcxr duplicates: exact and near-duplicate groups, with patients and sources."""
    from covidcxr.store.duplicates import GROUP_COLUMNS, duplicate_groups, group_rows

    with store_from(args) as store, store.read() as conn:
        groups = duplicate_groups(
            conn, max_distance=args.max_distance, selection=filter_from(args, conn)
        )
    if args.cross_patient:
        groups = [g for g in groups if g.crosses_patients]
    rows = group_rows(groups)
    for row in rows:
        if args.format == "table":
            row["image_sha256"] = row["image_sha256"][:12]
    write_rows(rows, GROUP_COLUMNS, args.format)
    if args.format == "table":
        exact = sum(1 for g in groups if g.kind == "exact")
        print(
            f"{exact} exact and {len(groups) - exact} near-duplicate group(s); "
            f"{sum(1 for g in groups if g.crosses_patients)} filed under several patients, "
            f"{sum(1 for g in groups if len(g.sources) > 1)} under several sources",
            file=sys.stderr,
        )
    return 0


def _add_ingest_parser(subparsers: Any) -> None:
    ingest = subparsers.add_parser(
        "ingest",
        help="import a source (metadata, images, annotations) into the store",
        description="Import every metadata row, image, severity score, lung mask and lung "
        "box of a source. Idempotent: running it again changes nothing.",
    )
    add_source_options(ingest)
    add_store_options(ingest)
    ingest.add_argument(
        "--strict", action="store_true", help="refuse the whole ingest if any error is found"
    )
    ingest.add_argument(
        "--allow-removals",
        action="store_true",
        help="remove stored records the table no longer lists, however many (without it, "
        "an ingest that would remove over 10%% of a source's records, or any after a row "
        "could not be read, is refused)",
    )
    ingest.add_argument(
        "--dry-run", action="store_true", help="print what would change; write nothing"
    )
    ingest.add_argument(
        "--report-dir",
        metavar="DIR",
        help="where the JSON and CSV report go (default: DATA_DIR/reports)",
    )
    ingest.add_argument(
        "--show",
        type=int,
        default=10,
        metavar="N",
        help="print the first N errors/warnings (default 10)",
    )
    ingest.set_defaults(handler=cmd_ingest)


def _add_check_parser(subparsers: Any) -> None:
    check = subparsers.add_parser(
        "check",
        help="validate a source without writing anything (exit 1 on failure)",
        description="The same validation as ingest, writing nothing: unique rows, every "
        "image referenced, every referenced image present and decodable, format matches "
        "extension, values in range, pediatric patients flagged.",
    )
    add_source_options(check)
    check.add_argument("--format", choices=FORMATS, default="table")
    check.add_argument(
        "--fail-on",
        choices=("error", "warning", "never"),
        default="warning",
        help="lowest severity that fails the check (default: warning, so that a missing "
        "image or an out-of-range value fails the collection's CI)",
    )
    check.add_argument("--report", metavar="STEM", help="also write STEM.json and STEM.csv")
    check.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="print the first N errors/warnings (default 20)",
    )
    check.set_defaults(handler=cmd_check)


def _add_list_parser(subparsers: Any) -> None:
    listing = subparsers.add_parser(
        "list",
        help="list records (one per metadata row)",
        description="One line per metadata row that passes the filters. On a terminal, "
        "long cells are cut to fit (--wide shows them whole); in a pipe or a file nothing "
        "is cut, so a file name can be pasted into `covidcxr show`.",
    )
    add_filter_options(listing)
    add_store_options(listing)
    listing.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table for people, csv or json (every column) for programs (default: table)",
    )
    listing.add_argument(
        "--limit", type=positive_int, metavar="N", help="print at most N records (default: all)"
    )
    listing.add_argument(
        "--wide", action="store_true", help="never cut long cells, even on a terminal"
    )
    listing.set_defaults(handler=cmd_list)


def _add_show_parser(subparsers: Any) -> None:
    show = subparsers.add_parser(
        "show",
        help="everything about one image or patient",
        description="Every record of an image or a patient: a patient summary, then each "
        "record with its image and annotations. A bare patient id that several sources "
        "use shows each patient under its own heading.",
    )
    show.add_argument(
        "key",
        metavar="IMAGE_OR_PATIENT",
        help="sha256 (8+ hex digits), file name, #RECORD_ID, or [SOURCE:]PATIENT",
    )
    add_store_options(show)
    show.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table (readable text) or json (default: table)",
    )
    show.set_defaults(handler=cmd_show)


def _add_stats_parser(subparsers: Any) -> None:
    stats = subparsers.add_parser("stats", help="counts by source, view, finding, outcome")
    add_filter_options(stats)
    add_store_options(stats)
    stats.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    stats.set_defaults(handler=cmd_stats)


def _add_duplicates_parser(subparsers: Any) -> None:
    duplicates = subparsers.add_parser(
        "duplicates",
        help="exact and near-duplicate images across patients and sources",
        description="Groups of records whose images are the same picture: exact (same "
        "bytes) or near (resized, recompressed, framed; from perceptual hashes). Crops "
        "of more than ~2% per side are mostly missed.",
    )
    add_filter_options(duplicates)
    add_store_options(duplicates)
    duplicates.add_argument(
        "--max-distance",
        type=int,
        metavar="BITS",
        help="largest hash distance of a near duplicate, of 128 bits "
        "(default 10: the largest with no false pair on the collection)",
    )
    duplicates.add_argument(
        "--cross-patient", action="store_true", help="only groups filed under more than one patient"
    )
    duplicates.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default: table)"
    )
    duplicates.set_defaults(handler=cmd_duplicates)


def register(subparsers: Any) -> None:
    """Add the collection commands."""
    _add_ingest_parser(subparsers)
    _add_check_parser(subparsers)
    _add_list_parser(subparsers)
    _add_show_parser(subparsers)
    _add_stats_parser(subparsers)
    _add_duplicates_parser(subparsers)
