"""The ``mipp`` command.

    mipp list [models|datasets]           what can be built and loaded
    mipp train --model M --dataset D ...  train a zoo model, save a run directory
    mipp eval CHECKPOINT                  loss and top-1 accuracy of a checkpoint
    mipp info CHECKPOINT | --model M      per-layer widths, parameters, MACs

Errors a user can cause are printed as one line (``mipp: error: ...``) with exit status 2;
set ``MIPP_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mipp import __version__, data, models
from mipp.checkpoint import (
    atomic_write_bytes,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from mipp.config import OPTIMIZERS, SCHEDULES, TrainConfig
from mipp.errors import MippError
from mipp.metrics import count_macs, count_params, layer_widths, measure_latency
from mipp.train import evaluate, seeded, train
from mipp.types import ModelSpec

__all__ = ["build_parser", "main"]


# ----------------------------------------------------------------------------- helpers


def _console() -> Console:
    return Console(highlight=False)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"widths are comma-separated whole numbers (e.g. 6,16,120,84), got {text!r}"
        ) from None


def _load_data(
    name: str, *, split: str, root: str | None, pad_to_32: bool, channels: int | None
) -> data.ImageDataset:
    return data.load_dataset(name, split=split, root=root, pad_to_32=pad_to_32, channels=channels)


def _input_shape(ds: data.ImageDataset) -> tuple[int, ...]:
    return tuple(ds.x.shape[1:])


def _size_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _model_numbers(
    model: torch.nn.Module, input_shape: tuple[int, ...], *, latency_repeats: int
) -> dict[str, Any]:
    macs = count_macs(model, input_shape)
    out: dict[str, Any] = {
        "params": count_params(model),
        "macs": macs.macs,
        "flops": macs.flops,
        "widths": layer_widths(model),
    }
    if latency_repeats > 0:
        lat = measure_latency(model, input_shape, batch_sizes=(1, 64), repeats=latency_repeats)
        out["latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
    return out


# ----------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    console = _console()
    if args.what in ("models", "all"):
        table = Table(title="models (mipp.models.create)")
        table.add_column("name")
        table.add_column("description")
        for name in models.list_models():
            table.add_row(name, models.describe(name))
        console.print(table)
    if args.what in ("datasets", "all"):
        table = Table(title="datasets (mipp.data.load_dataset)")
        table.add_column("name")
        table.add_column("description")
        for name in data.list_datasets():
            table.add_row(name, data.describe_dataset(name))
        console.print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    console = _console()
    out = Path(args.out)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=args.augment,
        seed=args.seed,
    )
    full = _load_data(
        args.dataset,
        split="train",
        root=args.data_root,
        pad_to_32=args.pad_to_32,
        channels=args.channels,
    )
    test = _load_data(
        args.dataset,
        split="test",
        root=args.data_root,
        pad_to_32=args.pad_to_32,
        channels=args.channels,
    )
    if args.val_fraction > 0:
        train_ds, val_ds = data.train_val_split(
            full, val_fraction=args.val_fraction, seed=args.seed
        )
    else:
        train_ds, val_ds = full, None
    if full.input_size is None:
        raise MippError(f"dataset {args.dataset!r} holds vectors; use --model mlp with it")
    spec = ModelSpec(
        args.model,
        num_classes=full.num_classes,
        in_channels=full.in_channels,
        input_size=full.input_size,
        widths=args.widths,
    )
    with seeded(args.seed):
        model = build_model(spec)
    console.print(
        f"training [bold]{spec.name}[/] on [bold]{args.dataset}[/] "
        f"({len(train_ds):,} train, {0 if val_ds is None else len(val_ds):,} validation, "
        f"{len(test):,} test; input {tuple(full.x.shape[1:])}) for {config.epochs} epoch(s)"
    )
    run_config = {
        "command": "train",
        "mipp_version": __version__,
        "torch_version": torch.__version__,
        "model": spec.to_dict(),
        "dataset": {
            "name": args.dataset,
            "root": args.data_root,
            "pad_to_32": args.pad_to_32,
            "channels": args.channels,
            "val_fraction": args.val_fraction,
        },
        "train": config.to_dict(),
        "device": args.device,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", run_config)
    history = train(
        model, train_ds, config, val_data=val_ds, device=args.device, progress=not args.no_progress
    )
    model.to("cpu")
    result = evaluate(model, test)
    numbers = _model_numbers(model, _input_shape(full), latency_repeats=args.latency_repeats)
    metrics = {
        "test_loss": result.loss,
        "test_top1": result.top1,
        "test_samples": result.n,
        "train_seconds": history.seconds,
        "history": history.to_dict()["epochs"],
        **numbers,
    }
    _write_json(out / "metrics.json", metrics)
    ckpt = save_checkpoint(
        out / "model.safetensors",
        model,
        spec=spec,
        extra={
            "dataset": run_config["dataset"],
            "train": config.to_dict(),
            "test_top1": result.top1,
        },
    )
    rows = [
        ("test accuracy (top-1)", f"{result.top1:.4f}"),
        ("test loss", f"{result.loss:.4f}"),
        ("training time", f"{history.seconds:.1f} s"),
        ("parameters", _fmt_int(numbers["params"])),
        ("MACs / sample", _fmt_int(numbers["macs"])),
        ("FLOPs / sample (2 x MACs)", _fmt_int(numbers["flops"])),
    ]
    for b, ms in numbers.get("latency_ms", {}).items():
        rows.append((f"CPU latency, batch {b} (median)", f"{ms:.2f} ms"))
    console.print(_size_table(f"{spec.name} on {args.dataset}", rows))
    console.print(
        f"saved {ckpt} (+ {ckpt.with_suffix('.json').name}, config.json, metrics.json) in {out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    console = _console()
    ckpt = load_checkpoint(args.checkpoint)
    ds_meta = ckpt.meta.get("extra", {}).get("dataset", {})
    name = args.dataset or ds_meta.get("name")
    if name is None:
        raise MippError(f"{args.checkpoint} does not record its dataset; pass --dataset")
    pad = ds_meta.get("pad_to_32", False) if args.dataset is None else args.pad_to_32
    channels = ds_meta.get("channels") if args.dataset is None else args.channels
    ds = _load_data(
        name,
        split=args.split,
        root=args.data_root or ds_meta.get("root"),
        pad_to_32=pad,
        channels=channels,
    )
    t0 = time.perf_counter()
    result = evaluate(ckpt.model, ds, device=args.device)
    seconds = time.perf_counter() - t0
    console.print(
        _size_table(
            f"{ckpt.spec.name} on {name} ({args.split})",
            [
                ("top-1 accuracy", f"{result.top1:.4f}"),
                ("loss", f"{result.loss:.4f}"),
                ("samples", _fmt_int(result.n)),
                ("time", f"{seconds:.1f} s"),
            ],
        )
    )
    if args.json:
        print(json.dumps({"top1": result.top1, "loss": result.loss, "n": result.n}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    console = _console()
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
            _fmt_int(params_per_layer.get(name, 0)),
            _fmt_int(macs.per_layer.get(name, 0)),
        )
    console.print(table)
    total = count_params(model)
    console.print(
        _size_table(
            "totals",
            [
                ("parameters", _fmt_int(total)),
                ("MACs / sample", _fmt_int(macs.macs)),
                ("FLOPs / sample (2 x MACs)", _fmt_int(macs.flops)),
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


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipp",
        description="Mutual Information Preserving Pruning for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"mipp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the models and datasets mipp knows")
    p.add_argument(
        "what",
        nargs="?",
        choices=("models", "datasets", "all"),
        default="all",
        help="what to list (default: all)",
    )
    p.set_defaults(func=cmd_list)

    def add_data_options(p: argparse.ArgumentParser, *, required: bool) -> None:
        p.add_argument(
            "--dataset",
            required=required,
            default=None,
            help=f"dataset name, one of: {', '.join(data.list_datasets())}",
        )
        p.add_argument(
            "--data-root",
            default=None,
            help="directory holding the dataset files (default: $MIPP_DATA/<name>, "
            "then the Debian location)",
        )
        p.add_argument(
            "--pad-to-32",
            action="store_true",
            help="zero-pad 28x28 images to 32x32 (for CIFAR-style models)",
        )
        p.add_argument(
            "--channels",
            type=int,
            choices=(1, 3),
            default=None,
            help="repeat grey images to 3 channels (3) or keep them (1)",
        )

    p = sub.add_parser("train", help="train a zoo model and save a run directory")
    p.add_argument(
        "--model", required=True, help=f"model name, one of: {', '.join(models.list_models())}"
    )
    p.add_argument(
        "--widths",
        type=_widths,
        default=None,
        help="comma-separated layer widths for mlp / lenet5 / vgg (default: standard)",
    )
    add_data_options(p, required=True)
    p.add_argument("--epochs", type=_positive_int, default=3, help="training epochs (default 3)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=128, help="mini-batch size (default 128)"
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="optimizer (default sgd, with momentum and Nesterov)",
    )
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument(
        "--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)"
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule: cosine (per step), step (x0.1 at 1/3 and 2/3 "
        "of the run) or constant (default cosine)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop + flip augmentation (default: on for CIFAR, off otherwise)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of the training set for per-epoch validation "
        "(default 0: none)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of model initialisation, shuffling and augmentation (default 0)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--out",
        default="runs/train",
        help="run directory for checkpoint, config and metrics (default runs/train)",
    )
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=20,
        help="timed runs per batch size for CPU latency; 0 skips it (default 20)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (loss, top-1 accuracy)")
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    add_data_options(p, required=False)
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="test",
        help="which split to evaluate on (default test)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="per-layer widths, parameters and MACs of a model")
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
        type=_widths,
        default=None,
        help="comma-separated layer widths for mlp / lenet5 / vgg",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        default=10,
        help="classes of the fresh model (default 10)",
    )
    p.add_argument(
        "--in-channels",
        type=_positive_int,
        default=3,
        help="input channels of the fresh model (default 3)",
    )
    p.add_argument(
        "--input-size",
        type=_positive_int,
        default=32,
        help="input side in pixels of the fresh model (default 32)",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mipp`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MippError, ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("MIPP_DEBUG"):
            raise
        message = ""
        for line in filter(None, (part.strip() for part in str(e).splitlines())):
            message += ("" if not message else " " if message.endswith(":") else "; ") + line
        print(f"mipp: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mipp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
