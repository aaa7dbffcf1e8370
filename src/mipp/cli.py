"""The ``mipp`` command.

    mipp list [models|datasets]           what can be built and loaded
    mipp train --model M --dataset D ...  train a zoo model, save a run directory
    mipp eval CHECKPOINT                  loss and top-1 accuracy of a checkpoint
    mipp info CHECKPOINT | --model M      per-layer widths, parameters, MACs
    mipp prune CHECKPOINT --sparsity S    prune (MIPP or --method NAME): checkpoint + report
    mipp finetune CHECKPOINT              re-train a (pruned) checkpoint
    mipp compare CKPT [CKPT ...]          accuracy, size, latency and widths side by side
    mipp sweep CONFIG [--profile quick]   run an experiment grid (resumable)
    mipp report SWEEP_DIR                 tables, plots and REPORT.md of a sweep

Errors a user can cause are printed as one line (``mipp: error: ...``) with exit status 2;
set ``MIPP_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mipp import __version__, commands, data, models
from mipp.baselines import METHOD_NAMES
from mipp.config import OPTIMIZERS, SCHEDULES
from mipp.errors import MippError
from mipp.experiments import commands as experiments

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _pool(text: str) -> str | int:
    if text == "mean":
        return "mean"
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"pool is 'mean' or a positive integer k, got {text!r}")
    return k


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"widths are comma-separated whole numbers (e.g. 6,16,120,84), got {text!r}"
        ) from None


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipp",
        description="Mutual Information Preserving Pruning for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"mipp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the models, datasets and pruning methods mipp knows")
    p.add_argument(
        "what",
        nargs="?",
        choices=("models", "datasets", "methods", "all"),
        default="all",
        help="what to list (default: all)",
    )
    p.set_defaults(func=commands.cmd_list)

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

    def add_train_options(p: argparse.ArgumentParser, *, epochs: int, lr: float) -> None:
        p.add_argument(
            "--epochs",
            type=_positive_int,
            default=epochs,
            help=f"training epochs (default {epochs})",
        )
        p.add_argument(
            "--batch-size", type=_positive_int, default=128, help="mini-batch size (default 128)"
        )
        p.add_argument(
            "--optimizer",
            choices=OPTIMIZERS,
            default="sgd",
            help="optimizer (default sgd, with momentum and Nesterov)",
        )
        p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
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
    add_train_options(p, epochs=3, lr=0.05)
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
    p.set_defaults(func=commands.cmd_train)

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
    p.set_defaults(func=commands.cmd_eval)

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
    p.set_defaults(func=commands.cmd_info)

    p = sub.add_parser(
        "prune",
        help="prune a checkpoint with MIPP or a baseline (pruned checkpoint + report.json)",
        description="Prune a checkpoint with MIPP (default) or a baseline (--method). Give "
        "exactly one of --sparsity (target mode: for MIPP a global threshold on the relative "
        "conditional MI is bisected until the achieved sparsity is within --tolerance), "
        "--match REPORT (the achieved sparsity of another run's report.json, for "
        "equal-sparsity comparisons), --confidence (MIPP: the paper's test) or --threshold "
        "(MIPP: one pass with a fixed relative threshold).",
    )
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--sparsity",
        type=_fraction,
        help="global sparsity to reach, in [0, 1) (what it counts: --target)",
    )
    how.add_argument(
        "--match",
        metavar="REPORT",
        help="report.json of another run: reach its achieved sparsity of --target",
    )
    how.add_argument(
        "--confidence",
        type=_fraction,
        help="paper mode: keep a unit iff more than this sure (0..1) it adds information",
    )
    how.add_argument(
        "--threshold",
        type=_fraction,
        help="fixed threshold on the relative conditional MI (share of the target's variance)",
    )
    p.add_argument(
        "--target",
        choices=("units", "params", "macs"),
        default="units",
        help="what --sparsity counts: units removed (the paper's PR), parameters or MACs "
        "(default units)",
    )
    p.add_argument(
        "--method",
        default="mipp",
        help="mipp (default) or a baseline: " + ", ".join(METHOD_NAMES[1:]),
    )
    p.add_argument(
        "--allocation",
        choices=("global", "uniform"),
        default=None,
        help="baselines: global ranking or uniform per-layer ratio (default: the method's)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a baseline's own option, e.g. rounds=5 or temperature=100 (repeatable)",
    )
    p.add_argument(
        "--estimator",
        default=None,
        help="MIPP's conditional-MI estimator: linear (closed form, default), gaussian "
        "(nats), mlp (the paper's, slow), ksg (k-nearest-neighbour, nats, nonparametric)",
    )
    p.add_argument(
        "--pool",
        type=_pool,
        default=None,
        help="MIPP: per-channel pooling of conv maps: mean (default) or k for k x k blocks",
    )
    p.add_argument(
        "--calib-samples",
        type=_positive_int,
        default=2048,
        help="calibration samples drawn (seeded) from the training split (default 2048)",
    )
    p.add_argument(
        "--scope",
        choices=("internal", "all"),
        default="internal",
        help="internal: block-internal groups of residual nets (every layer of plain nets); "
        "all: residual streams too (default internal)",
    )
    p.add_argument(
        "--min-keep",
        type=_positive_int,
        default=None,
        help="MIPP: units every layer keeps (default 1)",
    )
    p.add_argument(
        "--order",
        choices=("mi", "index", "random"),
        default=None,
        help="MIPP: unit test order: mi ascending as in the paper (default), index or random",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="allowed |achieved - requested| sparsity (default 0.01)",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="after removal, re-fit the consumers of removed units by ridge least squares to "
        "the unpruned network's pre-activations on the calibration data (one-shot accuracy; "
        "any method)",
    )
    p.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="after removal, re-estimate BatchNorm running statistics on the calibration data",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration subset etc. (default 0)"
    )
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument("--out", default="runs/pruned", help="run directory (default runs/pruned)")
    p.add_argument("--no-eval", action="store_true", help="skip test accuracy before/after")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    p.set_defaults(func=commands.cmd_prune)

    p = sub.add_parser("finetune", help="re-train a (pruned) checkpoint and save it")
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    add_train_options(p, epochs=1, lr=0.05)
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="runs/finetuned", help="run directory (default runs/finetuned)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=commands.cmd_finetune)

    p = sub.add_parser(
        "compare", help="accuracy, parameters, MACs, latency and widths of checkpoints"
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints to compare (first = reference)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=20,
        help="timed runs per batch size for CPU latency; 0 skips it (default 20)",
    )
    p.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser(
        "sweep",
        help="run an experiment grid from a TOML config (resumable: finished runs are kept)",
    )
    p.add_argument("config", help="a TOML config, e.g. experiments/lenet5_fmnist.toml")
    p.add_argument("--profile", default=None, help="a [profiles.NAME] of the config, e.g. quick")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--device", default="cpu", help="torch device for every run (default cpu)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--report", action="store_true", help="write the report (mipp report) when done")
    p.add_argument("--report-out", default=None, help="report folder (default results/<name>)")
    p.set_defaults(func=experiments.cmd_sweep)

    p = sub.add_parser(
        "report", help="aggregate a sweep into results/<name>/ (CSV, PNG, REPORT.md)"
    )
    p.add_argument("sweep_dir", help="a directory written by mipp sweep")
    p.add_argument("--out", default=None, help="output folder (default results/<name>)")
    p.set_defaults(func=experiments.cmd_report)
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
