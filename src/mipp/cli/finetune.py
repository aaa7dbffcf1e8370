"""``mipp finetune CHECKPOINT``: re-train a (pruned) checkpoint on its dataset and save it.

The pruned architecture travels with the checkpoint (its sidecar's replay records), so the
fine-tuned checkpoint loads like the pruned one. The run directory (``config.json``,
``metrics.json``, the checkpoint) is built whole under a temporary name and swapped into
place at the end (:func:`mipp._io.run_directory`): ``--out`` must not contain the input
checkpoint and, unless ``--force``, must be missing or empty (the default too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mipp import __version__, distributed
from mipp._io import run_directory
from mipp.cli._common import (
    add_force_flag,
    add_train_flags,
    checkpoint_data,
    device,
    distributed_command,
    make_console,
    rendering,
    size_table,
    train_config,
    write_run_json,
)
from mipp.metrics import count_params
from mipp.zoo import training
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint, sidecar_path
from mipp.zoo.data import train_val_split

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="re-train a (pruned) checkpoint and save it")
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    add_train_flags(p, epochs=1, lr=0.05)
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--out",
        default="runs/finetuned",
        help="run directory (default runs/finetuned); one that holds files is refused without "
        "--force",
    )
    add_force_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mipp finetune``; under ``torchrun`` with DistributedDataParallel (``--batch-size`` per
    rank, :func:`mipp.zoo.training.train`), rank 0 alone evaluating, printing and writing."""
    return distributed_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    lead = distributed.rank() == 0
    console = make_console(quiet=not lead)
    inputs = [args.checkpoint, sidecar_path(args.checkpoint), args.data_root]
    rundir = run_directory(args.out, force=args.force, inputs=inputs) if lead else None
    ckpt = load_checkpoint(args.checkpoint)
    config = train_config(args)
    full = checkpoint_data(ckpt, args.checkpoint, split="train", root=args.data_root)
    test = checkpoint_data(ckpt, args.checkpoint, split="test", root=args.data_root)
    if args.val_fraction > 0:
        train_ds, val_ds = train_val_split(full, val_fraction=args.val_fraction, seed=args.seed)
    else:
        train_ds, val_ds = full, None
    before = training.evaluate(ckpt.model, test)
    console.print(
        f"fine-tuning [bold]{ckpt.spec.name}[/] ({count_params(ckpt.model):,} params) for "
        f"{config.epochs} epoch(s); test accuracy before {before.top1:.4f}"
    )
    run_config = {
        "command": "finetune",
        "checkpoint": str(args.checkpoint),
        "train": config.to_dict(),
        "mipp_version": __version__,
        "device": args.device,
    }
    with rendering(console, enabled=lead and not args.no_progress) as progress:
        history = training.train(
            ckpt.model, train_ds, config, val_data=val_ds, device=args.device, progress=progress
        )
    ckpt.model.to("cpu")
    if not lead:  # the same model: rank 0 evaluates and writes it
        return 0
    after = training.evaluate(ckpt.model, test)
    metrics = {
        "test_top1_before": before.top1,
        "test_top1": after.top1,
        "test_loss": after.loss,
        "train_seconds": history.seconds,
        "history": history.to_dict()["epochs"],
        "params": count_params(ckpt.model),
    }
    extra = dict(ckpt.meta.get("extra", {}))
    extra.update(parent=str(args.checkpoint), finetune=config.to_dict(), test_top1=after.top1)
    with rundir as out:  # built under a temporary name, swapped into place at the end
        write_run_json(out / "config.json", run_config)
        write_run_json(out / "metrics.json", metrics)
        save_checkpoint(
            out / "model.safetensors",
            ckpt.model,
            spec=ckpt.spec,
            extra=extra,
            pruning=ckpt.meta.get("pruning", []),
        )
    path = Path(args.out) / "model.safetensors"
    console.print(
        size_table(
            f"{ckpt.spec.name} fine-tuned",
            [
                ("test accuracy before", f"{before.top1:.4f}"),
                ("test accuracy after", f"{after.top1:.4f}"),
                ("training time", f"{history.seconds:.1f} s"),
            ],
        )
    )
    console.print(f"saved {path} (+ model.json, config.json, metrics.json)")
    return 0
