"""Writing a benchmark's results: one CSV row per run, and a JSON with the rows, the command,
the machine and the date (shared by the scripts in this folder)."""

from __future__ import annotations

import csv
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def write_results(stem: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write ``<stem>.csv`` (``rows``) and ``<stem>.json`` (``meta`` + machine, date, rows)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    record = {
        **meta,
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
