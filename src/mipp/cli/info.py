"""``mipp info CHECKPOINT | --model M``: per-layer widths, parameters and MACs of a model."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from mipp.cli._common import fmt_int, make_console, positive_int, size_table, widths
from mipp.errors import MippError
from mipp.metrics import count_macs, count_params, layer_widths
from mipp.types import ModelSpec
from mipp.zoo import models
from mipp.zoo.checkpoint import build_model, load_checkpoint

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="per-layer widths, parameters and MACs of a model")
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="path to a .safetensors checkpoint (or use --model)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"describe a fresh zoo model instead: {', '.join(models.list_models())}",
    )
    p.add_argument(
        "--widths",
        type=widths,
        default=None,
        help="comma-separated layer widths for mlp / lenet5 / vgg",
    )
    p.add_argument(
        "--num-classes",
        type=positive_int,
        default=10,
        help="classes of the fresh model (default 10)",
    )
    p.add_argument(
        "--in-channels",
        type=positive_int,
        default=3,
        help="input channels of the fresh model (default 3)",
    )
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=32,
        help="input side in pixels of the fresh model (default 32)",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if (args.checkpoint is None) == (args.model is None):
        raise MippError("give either a CHECKPOINT or --model NAME (not both)")
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        model, spec = ckpt.model, ckpt.spec
    else:
        spec = ModelSpec(
            args.model,
            num_classes=args.num_classes,
            in_channels=args.in_channels,
            input_size=args.input_size,
            widths=args.widths,
        )
        model = build_model(spec)
    shape = (spec.in_channels, spec.input_size, spec.input_size)
    macs = count_macs(model, shape)
    params_per_layer = {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in model.named_modules()
    }
    table = Table(title=f"{spec.name}: Conv/Linear layers (input {shape})")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("units", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    named = dict(model.named_modules())
    for name, width in layer_widths(model).items():
        table.add_row(
            name,
            type(named[name]).__name__,
            str(width),
            fmt_int(params_per_layer.get(name, 0)),
            fmt_int(macs.per_layer.get(name, 0)),
        )
    console.print(table)
    total = count_params(model)
    console.print(
        size_table(
            "totals",
            [
                ("parameters", fmt_int(total)),
                ("MACs / sample", fmt_int(macs.macs)),
                ("FLOPs / sample (2 x MACs)", fmt_int(macs.flops)),
            ],
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": spec.to_dict(),
                    "params": total,
                    "macs": macs.macs,
                    "widths": layer_widths(model),
                }
            )
        )
    return 0
