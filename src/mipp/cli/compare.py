"""``mipp compare CKPT [CKPT ...]``: accuracy, size, latency and widths side by side.

The first checkpoint is the reference of every ratio. CPU latency is measured for all models
interleaved (:func:`mipp.metrics.compare_latency`), so the speed-ups hold on a busy machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from mipp.cli._common import (
    check_data_fits,
    checkpoint_data,
    fmt_ratio,
    input_shape,
    make_console,
    model_numbers,
    non_negative_int,
)
from mipp.errors import MippError
from mipp.metrics import compare_latency
from mipp.validation import expected_input_shape
from mipp.zoo.checkpoint import load_checkpoint
from mipp.zoo.training import evaluate

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="accuracy, parameters, MACs, latency and widths of checkpoints"
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints to compare (first = reference)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument(
        "--latency-repeats",
        type=non_negative_int,
        default=20,
        help="timed runs per batch size for CPU latency; 0 skips it (default 20)",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    p.set_defaults(func=run)


def _label(row: dict[str, Any]) -> str:
    return Path(row["checkpoint"]).parent.name or row["checkpoint"]


def run(args: argparse.Namespace) -> int:
    console = make_console()
    rows: list[dict[str, Any]] = []
    loaded = []
    checkpoints = [(path, load_checkpoint(path)) for path in args.checkpoints]
    shapes = {path: expected_input_shape(c.spec) for path, c in checkpoints}
    first = args.checkpoints[0]
    for path, shape in shapes.items():
        if shape != shapes[first]:  # one latency timing and one set of ratios need one input
            raise MippError(
                f"compare needs checkpoints that take the same input: {first} takes "
                f"{shapes[first]}, {path} takes {shape}; compare them separately"
            )
    for path, ckpt in checkpoints:
        test = checkpoint_data(ckpt, path, split="test", root=args.data_root)
        check_data_fits(ckpt, path, test)
        result = evaluate(ckpt.model, test)
        numbers = model_numbers(ckpt.model, input_shape(test), latency_repeats=0)
        rows.append({"checkpoint": str(path), "test_top1": result.top1, **numbers})
        loaded.append(ckpt.model)
    if args.latency_repeats > 0:  # side by side, so the ratios hold on a busy machine
        timings = compare_latency(loaded, input_shape(test), repeats=args.latency_repeats)
        for row, lat in zip(rows, timings, strict=True):
            row["latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
    ref = rows[0]
    table = Table(title="comparison (ratios against the first checkpoint)")
    table.add_column("")
    for r in rows:
        table.add_column(_label(r), justify="right")
    table.add_row("test accuracy", *(f"{r['test_top1']:.4f}" for r in rows))
    table.add_row("parameters", *(f"{r['params']:,}" for r in rows))
    table.add_row("  ratio", *(fmt_ratio(ref["params"], r["params"]) for r in rows))
    table.add_row("MACs / sample", *(f"{r['macs']:,}" for r in rows))
    table.add_row("  ratio", *(fmt_ratio(ref["macs"], r["macs"]) for r in rows))
    for b in ("1", "64"):
        if "latency_ms" in ref:
            table.add_row(
                f"CPU latency b{b} (median)", *(f"{r['latency_ms'][b]:.2f} ms" for r in rows)
            )
            table.add_row(
                "  speed-up", *(fmt_ratio(r["latency_ms"][b], ref["latency_ms"][b]) for r in rows)
            )
    console.print(table)
    widths = Table(title="units per layer")
    widths.add_column("layer")
    for r in rows:
        widths.add_column(_label(r), justify="right")
    for layer in ref["widths"]:
        widths.add_row(layer, *(str(r["widths"].get(layer, "-")) for r in rows))
    console.print(widths)
    if args.json:
        print(json.dumps(rows))
    return 0
