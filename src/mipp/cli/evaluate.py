"""``mipp eval CHECKPOINT``: loss and top-1 accuracy of a checkpoint.

The dataset is the one recorded in the checkpoint's sidecar unless ``--dataset`` names
another (then ``--pad-to-32`` / ``--channels`` apply to it).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import get_args

from mipp.cli._common import (
    add_data_flags,
    check_data_fits,
    device,
    fmt_int,
    make_console,
    size_table,
)
from mipp.errors import MippError
from mipp.zoo.checkpoint import load_checkpoint
from mipp.zoo.data import load_dataset
from mipp.zoo.data.readers import Split
from mipp.zoo.training import evaluate

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (loss, top-1 accuracy)")
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    add_data_flags(p, required=False)
    p.add_argument(
        "--split",
        choices=get_args(Split),
        default="test",
        help="which split to evaluate on (default test)",
    )
    p.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = make_console()
    ckpt = load_checkpoint(args.checkpoint)
    ds_meta = ckpt.meta.get("extra", {}).get("dataset", {})
    name = args.dataset or ds_meta.get("name")
    if name is None:
        raise MippError(f"{args.checkpoint} does not record its dataset; pass --dataset")
    pad = ds_meta.get("pad_to_32", False) if args.dataset is None else args.pad_to_32
    channels = ds_meta.get("channels") if args.dataset is None else args.channels
    ds = load_dataset(
        name,
        split=args.split,
        root=args.data_root or ds_meta.get("root"),
        pad_to_32=pad,
        channels=channels,
    )
    check_data_fits(ckpt, args.checkpoint, ds)
    t0 = time.perf_counter()
    result = evaluate(ckpt.model, ds, device=args.device)
    seconds = time.perf_counter() - t0
    console.print(
        size_table(
            f"{ckpt.spec.name} on {name} ({args.split})",
            [
                ("top-1 accuracy", f"{result.top1:.4f}"),
                ("loss", f"{result.loss:.4f}"),
                ("samples", fmt_int(result.n)),
                ("time", f"{seconds:.1f} s"),
            ],
        )
    )
    if args.json:
        print(json.dumps({"top1": result.top1, "loss": result.loss, "n": result.n}))
    return 0
