"""``mipp train``: train a zoo model on a dataset and save a run directory.

The run directory holds ``config.json``, ``metrics.json`` (test accuracy and loss, per-epoch
history, parameters, MACs, CPU latency) and the checkpoint ``model.safetensors`` with its
sidecar ``model.json``. It is built whole under a temporary name and swapped into place at
the end (:func:`mipp._io.run_directory`); ``--out`` must be missing or empty unless
``--force`` (the default ``runs/train`` too).

Vector datasets (``synthetic``) take ``--model mlp`` only; the model is built with
``in_channels`` = the feature count and ``input_size`` 1, as a sweep builds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mipp import __version__, distributed
from mipp._io import run_directory
from mipp.cli._common import (
    add_data_flags,
    add_force_flag,
    add_train_flags,
    device,
    distributed_command,
    fmt_int,
    input_shape,
    make_console,
    model_numbers,
    non_negative_int,
    rendering,
    size_table,
    train_config,
    widths,
    write_run_json,
)
from mipp.errors import MippError
from mipp.types import ModelSpec
from mipp.zoo import models, training
from mipp.zoo.checkpoint import build_model, save_checkpoint
from mipp.zoo.data import load_dataset, train_val_split

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a zoo model and save a run directory")
    p.add_argument(
        "--model", required=True, help=f"model name, one of: {', '.join(models.list_models())}"
    )
    p.add_argument(
        "--widths",
        type=widths,
        default=None,
        help="comma-separated layer widths for mlp / lenet5 / vgg (default: standard)",
    )
    add_data_flags(p, required=True)
    add_train_flags(p, epochs=3, lr=0.05)
    p.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--out",
        default="runs/train",
        help="run directory for checkpoint, config and metrics (default runs/train); one "
        "that holds files is refused without --force",
    )
    add_force_flag(p)
    p.add_argument(
        "--latency-repeats",
        type=non_negative_int,
        default=20,
        help="timed runs per batch size for CPU latency; 0 skips it (default 20)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mipp train``; under ``torchrun`` with DistributedDataParallel (``--batch-size`` per
    rank, :func:`mipp.zoo.training.train`), rank 0 alone evaluating, printing and writing."""
    return distributed_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    lead = distributed.rank() == 0
    console = make_console(quiet=not lead)
    rundir = run_directory(args.out, force=args.force, inputs=[args.data_root]) if lead else None
    config = train_config(args)
    data_options = {"root": args.data_root, "pad_to_32": args.pad_to_32, "channels": args.channels}
    full = load_dataset(args.dataset, split="train", **data_options)
    test = load_dataset(args.dataset, split="test", **data_options)
    if args.val_fraction > 0:
        train_ds, val_ds = train_val_split(full, val_fraction=args.val_fraction, seed=args.seed)
    else:
        train_ds, val_ds = full, None
    if full.input_size is None and args.model != "mlp":
        raise MippError(
            f"dataset {args.dataset!r} holds vectors; it takes --model mlp, not {args.model!r}"
        )
    spec = ModelSpec(
        args.model,
        num_classes=full.num_classes,
        in_channels=full.in_channels,  # the feature count of vector data (with input_size 1)
        input_size=full.input_size or 1,
        widths=args.widths,
    )
    with training.seeded(args.seed):
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
    with rendering(console, enabled=lead and not args.no_progress) as progress:
        history = training.train(
            model, train_ds, config, val_data=val_ds, device=args.device, progress=progress
        )
    model.to("cpu")
    if not lead:  # the same model: rank 0 evaluates and writes it
        return 0
    result = training.evaluate(model, test)
    numbers = model_numbers(model, input_shape(full), latency_repeats=args.latency_repeats)
    metrics = {
        "test_loss": result.loss,
        "test_top1": result.top1,
        "test_samples": result.n,
        "train_seconds": history.seconds,
        "history": history.to_dict()["epochs"],
        **numbers,
    }
    with rundir as tmp:  # built under a temporary name, swapped into place at the end
        write_run_json(tmp / "config.json", run_config)
        write_run_json(tmp / "metrics.json", metrics)
        save_checkpoint(
            tmp / "model.safetensors",
            model,
            spec=spec,
            extra={
                "dataset": run_config["dataset"],
                "train": config.to_dict(),
                "test_top1": result.top1,
            },
        )
    out = Path(args.out)
    ckpt = out / "model.safetensors"
    rows = [
        ("test accuracy (top-1)", f"{result.top1:.4f}"),
        ("test loss", f"{result.loss:.4f}"),
        ("training time", f"{history.seconds:.1f} s"),
        ("parameters", fmt_int(numbers["params"])),
        ("MACs / sample", fmt_int(numbers["macs"])),
        ("FLOPs / sample (2 x MACs)", fmt_int(numbers["flops"])),
    ]
    for b, ms in numbers.get("latency_ms", {}).items():
        rows.append((f"CPU latency, batch {b} (median)", f"{ms:.2f} ms"))
    console.print(size_table(f"{spec.name} on {args.dataset}", rows))
    console.print(
        f"saved {ckpt} (+ {ckpt.with_suffix('.json').name}, config.json, metrics.json) in {out}"
    )
    return 0
