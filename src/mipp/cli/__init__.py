"""The ``mipp`` command.

    mipp list [models|datasets|methods]   what can be built, loaded and pruned with
    mipp train --model M --dataset D ...  train a zoo model, save a run directory
    mipp eval CHECKPOINT                  loss and top-1 accuracy of a checkpoint
    mipp info CHECKPOINT | --model M      per-layer widths, parameters, MACs
    mipp prune CHECKPOINT --sparsity S    prune (MIPP or --method NAME): checkpoint + report
    mipp finetune CHECKPOINT              re-train a (pruned) checkpoint
    mipp compare CKPT [CKPT ...]          accuracy, size, latency and widths side by side
    mipp export CHECKPOINT --out M.onnx   ONNX file, checked against PyTorch (mipp[onnx])
    mipp sweep CONFIG [--profile quick]   run an experiment grid (resumable)
    mipp report SWEEP_DIR                 tables, plots and REPORT.md of a sweep

One module per command (:mod:`~mipp.cli.listing`, :mod:`~mipp.cli.train`,
:mod:`~mipp.cli.evaluate`, :mod:`~mipp.cli.info`, :mod:`~mipp.cli.prune`,
:mod:`~mipp.cli.finetune`, :mod:`~mipp.cli.compare`, :mod:`~mipp.cli.export`,
:mod:`~mipp.cli.sweep`, :mod:`~mipp.cli.report`), each with ``register(subparsers)`` (its
flags) and ``run(args)``; what they share is in :mod:`~mipp.cli._common`.

Errors a user can cause are printed as one line (``mipp: error: ...``) with exit status 2;
set ``MIPP_DEBUG=1`` to see the traceback instead. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mipp import __version__
from mipp.cli import compare, evaluate, export, finetune, info, listing, prune, report, sweep, train
from mipp.errors import MippError

__all__ = ["build_parser", "main"]

#: the command modules, in the order ``mipp --help`` lists them
COMMANDS = (listing, train, evaluate, info, prune, finetune, compare, export, sweep, report)


def build_parser() -> argparse.ArgumentParser:
    """The ``mipp`` parser: each command module adds its own subparser and flags."""
    parser = argparse.ArgumentParser(
        prog="mipp",
        description="Mutual Information Preserving Pruning for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"mipp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    message = ""
    for line in filter(None, (part.strip() for part in str(error).splitlines())):
        message += ("" if not message else " " if message.endswith(":") else "; ") + line
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mipp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MippError, ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("MIPP_DEBUG"):
            raise
        print(f"mipp: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mipp: interrupted", file=sys.stderr)
        return 130
