"""``mipp compare CKPT [CKPT ...]``: accuracy, size, latency and widths side by side.

The first checkpoint is the reference of every ratio. CPU latency is measured for all models
interleaved (:func:`mipp.metrics.compare_latency`), so the speed-ups hold on a busy machine.
When onnxruntime is installed (``mipp[onnx]``), each model is also exported to ONNX
(:func:`mipp.export.to_onnx`, checked against PyTorch) and timed in onnxruntime in the same
interleaved run: same batch sizes, warm-up, repeats, input and thread count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
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
from mipp.export import INSTALL_HINT, onnx_available, to_onnx
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
    p.add_argument(
        "--onnxruntime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time each model exported to ONNX in onnxruntime, interleaved with PyTorch "
        "(same batch sizes, warm-up, repeats and thread count). Default: on when onnx, "
        "onnxruntime and onnxscript are installed (mipp[onnx]); without them the onnxruntime "
        "rows are left out silently",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    p.set_defaults(func=run)


def _label(row: dict[str, Any]) -> str:
    return Path(row["checkpoint"]).parent.name or row["checkpoint"]


def _onnxruntime_modules(
    models: list[torch.nn.Module], paths: list[str], example: torch.Tensor
) -> list[torch.nn.Module]:
    """Each model exported to ONNX (checked against PyTorch on ``example`` and seeded
    inputs) and loaded in onnxruntime; an export that fails is one line naming the model."""
    out = []
    for model, path in zip(models, paths, strict=True):
        try:
            out.append(to_onnx(model, example).module())
        except MippError as e:
            raise MippError(f"{path}: {e} (--no-onnxruntime compares without it)") from None
    return out


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.onnxruntime and not onnx_available():
        raise MippError(f"--onnxruntime needs onnx, onnxruntime and onnxscript: {INSTALL_HINT}")
    use_ort = args.onnxruntime is not False and onnx_available()
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
        timed = list(loaded)
        if use_ort:
            timed += _onnxruntime_modules(loaded, args.checkpoints, test.x[:8])
        timings = compare_latency(timed, input_shape(test), repeats=args.latency_repeats)
        for row, lat in zip(rows, timings[: len(rows)], strict=True):
            row["latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
        for row, lat in zip(rows, timings[len(rows) :], strict=False):
            row["onnxruntime_latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
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
        for key, label in (
            ("latency_ms", "CPU latency"),
            ("onnxruntime_latency_ms", "onnxruntime"),
        ):
            if key in ref:
                table.add_row(f"{label} b{b} (median)", *(f"{r[key][b]:.2f} ms" for r in rows))
                table.add_row("  speed-up", *(fmt_ratio(r[key][b], ref[key][b]) for r in rows))
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
