"""``mipp report SWEEP_DIR``: a sweep's tables, plots and REPORT.md in ``results/<name>/``."""

from __future__ import annotations

import argparse

from mipp.cli._common import make_console
from mipp.experiments.report import copy_records, write_report

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="aggregate a sweep into results/<name>/ (CSV, PNG, REPORT.md)"
    )
    p.add_argument("sweep_dir", help="a directory written by mipp sweep")
    p.add_argument("--out", default=None, help="output folder (default results/<name>)")
    p.add_argument(
        "--records",
        action="store_true",
        help="also copy the sweep's records (sweep.json, every finished run's config and "
        "metrics, the reference runs' report) into <output folder>/sweep/: enough to report "
        "again, or to resume a study in progress from a fresh checkout",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = write_report(args.sweep_dir, args.out)
    console = make_console(stderr=True, soft_wrap=True)
    console.print(f"report written to {out}/REPORT.md")
    if args.records:
        count = copy_records(args.sweep_dir, out / "sweep")
        console.print(f"records of {count} finished run(s) copied to {out / 'sweep'}")
    return 0
