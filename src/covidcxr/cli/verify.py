"""``covidcxr verify``: re-hash every stored blob and name the records of bad ones."""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from covidcxr.cli.collection import add_store_options, store_from
from covidcxr.cli.output import FORMATS, write_rows
from covidcxr.store import queries
from covidcxr.store.blobs import BlobStore

RESULT_COLUMNS = ("state", *queries.BLOB_REFERENCE_COLUMNS)


def damaged_blobs(
    blobs: BlobStore, references: list[dict[str, Any]], sample: int | None, seed: int
) -> tuple[int, list[dict[str, Any]]]:
    """Re-hash the referenced blobs (all, or a random ``sample`` of them).

    Returns:
        how many distinct blobs were checked, and one row per reference to a blob
        that is ``missing`` or ``damaged`` (its bytes no longer hash to its name).
    """
    shas = sorted({row["sha256"] for row in references})
    if sample is not None and sample < len(shas):
        shas = sorted(random.Random(seed).sample(shas, sample))
    states = {sha: blobs.verify(sha) for sha in shas}
    bad = [
        {"state": states[row["sha256"]], **row}
        for row in references
        if states.get(row["sha256"], "ok") != "ok"
    ]
    return len(shas), bad


def cmd_verify(args: argparse.Namespace) -> int:
    """covidcxr verify: exit 1 when any blob is missing or damaged."""
    with store_from(args) as store, store.read() as conn:
        references = queries.blob_references(conn)
        checked, bad = damaged_blobs(store.blobs, references, args.sample, args.seed)
    if args.format != "table" or bad:
        write_rows(bad, RESULT_COLUMNS, args.format)
    states = {row["sha256"]: row["state"] for row in bad}
    missing = sum(1 for state in states.values() if state == "missing")
    print(
        f"verified {checked} blob(s) in {store.blobs.root}: {missing} missing, "
        f"{len(states) - missing} damaged, referenced by {len(bad)} record(s)/mask(s)",
        file=sys.stderr,
    )
    if bad:
        print(
            "re-ingest the sources named above to repair them from their files "
            "(ingest rewrites a damaged blob when the source still has the right bytes)",
            file=sys.stderr,
        )
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Add the verify command."""
    verify = subparsers.add_parser(
        "verify",
        help="re-hash every stored image and mask; exit 1 if any is missing or damaged",
        description="Reads every blob of the store and checks that its bytes still hash "
        "to its name (an MD5-per-attachment check, as Orthanc offers, with sha256); "
        "lists each missing or damaged one with the records that use it.",
    )
    add_store_options(verify)
    verify.add_argument(
        "--sample", type=int, metavar="N", help="check a random N blobs instead of all"
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    verify.add_argument("--format", choices=FORMATS, default="table")
    verify.set_defaults(handler=cmd_verify)
