"""``mipp prune CHECKPOINT``: prune with MIPP or a baseline; pruned checkpoint + report.

The method is built once, from the registry: the method flags that were given
(``--estimator``, ``--pool``, ``--order``, ``--min-keep``, ``--confidence``, ``--threshold``,
``--allocation``) and every ``--option KEY=VALUE`` go to
:func:`mipp.methods.make_method`, which refuses an option the method does not take. The other
flags are :func:`mipp.prune`'s. The run directory holds ``config.json`` (command, checkpoint,
the method's resolved options, every pipeline option, versions), ``report.json`` (the
:class:`~mipp.report.PruneReport`), ``metrics.json`` and the pruned checkpoint, whose sidecar
carries the replay record. It is built whole under a temporary name and swapped into place
at the end (:func:`mipp._io.run_directory`): ``--out`` must not contain the input checkpoint
and, unless ``--force``, must be missing or empty (the default ``runs/pruned`` too).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from mipp import __version__, distributed, pipeline
from mipp._io import run_directory
from mipp.cli._common import (
    add_force_flag,
    check_data_fits,
    checkpoint_data,
    distributed_command,
    fraction,
    make_console,
    pool,
    positive_int,
    rendering,
    seed,
    write_run_json,
)
from mipp.errors import MippError
from mipp.estimators import ESTIMATOR_NAMES
from mipp.methods import (
    ALL_ALLOCATIONS,
    BASELINE_NAMES,
    METHOD_NAMES,
    NOT_IMPLEMENTED,
    TARGETS,
    Method,
    make_method,
)
from mipp.methods.selection import ORDERS
from mipp.report import PruneReport
from mipp.surgery.structure import SCOPES
from mipp.validation import check_match_model
from mipp.zoo.checkpoint import load_checkpoint, save_checkpoint, sidecar_path
from mipp.zoo.training import evaluate

__all__ = ["register", "run"]

#: flags that are method options (attribute name = option name); None when not given
METHOD_FLAGS = (
    "estimator",
    "pool",
    "order",
    "min_keep",
    "confidence",
    "threshold",
    "allocation",
    "paper",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a checkpoint with MIPP or a baseline (pruned checkpoint + report.json)",
        description="Prune a checkpoint with MIPP (default) or a baseline (--method). Give "
        "exactly one of --sparsity (target mode: for MIPP a global threshold on the relative "
        "conditional MI is bisected until the achieved sparsity is within --tolerance), "
        "--match REPORT (the achieved sparsity of another run's report.json, for "
        "equal-sparsity comparisons), --confidence (MIPP: the paper's test) or --threshold "
        "(MIPP: one pass with a fixed relative threshold). Options a method does not take "
        "are refused with the list of those it does.",
    )
    p.add_argument("checkpoint", help="path to a .safetensors checkpoint with its .json sidecar")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--sparsity",
        type=fraction,
        help="global sparsity to reach, in [0, 1) (what it counts: --target)",
    )
    how.add_argument(
        "--match",
        metavar="REPORT",
        help="report.json of another run: reach its achieved sparsity of --target",
    )
    how.add_argument(
        "--confidence",
        type=fraction,
        help="MIPP: keep a unit iff more than this sure (0..1) it adds information (the paper)",
    )
    how.add_argument(
        "--threshold",
        type=fraction,
        help="MIPP: fixed threshold on the relative conditional MI (share of the target's "
        "variance)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="units",
        help="what --sparsity counts: units removed (the paper's PR), parameters, MACs, or "
        "latency predicted from a per-layer table measured here (default units)",
    )
    p.add_argument(
        "--latency-batch",
        type=positive_int,
        default=64,
        help="batch size of the latency table for --target latency (default 64; 1 for "
        "single-sample serving)",
    )
    p.add_argument(
        "--method",
        choices=METHOD_NAMES + tuple(NOT_IMPLEMENTED),  # the latter refused with the reason
        default="mipp",
        metavar="NAME",
        help="mipp (default) or a baseline: " + ", ".join(BASELINE_NAMES),
    )
    p.add_argument(
        "--allocation",
        choices=ALL_ALLOCATIONS,
        default=None,
        help="baselines: global ranking, uniform per-layer ratio, the per-layer widths of "
        "--match, or pfp (PFP's epsilon search; pfp only) (default: the method's)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any option of the method, e.g. rounds=5 or temperature=100; VALUE is read as "
        "JSON, else as text (repeatable)",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATOR_NAMES,
        default=None,
        help="MIPP's conditional-MI estimator: gaussian (closed form, nats; default), linear "
        "(the paper's loss difference in closed form), mlp (the paper's, slow), ksg "
        "(k-nearest-neighbour, nats, nonparametric)",
    )
    p.add_argument(
        "--paper",
        action="store_const",
        const=True,
        default=None,
        help="MIPP as published: the linear closed form of the paper's estimator and no "
        "reconstruction (explicit options still win)",
    )
    p.add_argument(
        "--pool",
        type=pool,
        default=None,
        help="MIPP: per-channel pooling of conv maps: mean (default) or k for k x k blocks",
    )
    p.add_argument(
        "--calib-samples",
        type=positive_int,
        default=2048,
        help="calibration samples drawn (seeded) from the training split (default 2048)",
    )
    p.add_argument(
        "--scope",
        choices=SCOPES,
        default="internal",
        help="internal: block-internal groups of residual nets (every layer of plain nets); "
        "all: residual streams too (default internal)",
    )
    p.add_argument(
        "--min-keep",
        type=positive_int,
        default=None,
        help="MIPP: units every layer keeps (default 1)",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default=None,
        help="MIPP: unit test order: mi ascending as in the paper (default), index or random",
    )
    p.add_argument(
        "--tolerance",
        type=fraction,
        default=0.01,
        help="allowed |achieved - requested| sparsity (default 0.01)",
    )
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after removal, re-fit the consumers of removed units by ridge least squares to "
        "the unpruned network's pre-activations on the calibration data (any method; default: "
        "the method's own choice — on for mipp, its reconstruction; off for baselines)",
    )
    p.add_argument(
        "--recalibrate-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after removal, re-estimate BatchNorm running statistics on the calibration data "
        "(default: as --compensate)",
    )
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of the calibration subset etc. (default 0)"
    )
    p.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="prune even on a degenerate calibration set (one distinct image, or fewer "
        "distinct images than half the samples), which is refused otherwise",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="LAYER",
        help="never remove units of this Conv/Linear/BatchNorm layer (as named in the report's "
        "groups or model.named_modules()); repeat for several",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check that the pruned model is the original with exactly the removed "
        "units switched off (advanced: the result is then unverified)",
    )
    p.add_argument("--data-root", default=None, help="dataset directory (default: as trained)")
    p.add_argument(
        "--out",
        default="runs/pruned",
        help="run directory (default runs/pruned); one that holds files is refused without --force",
    )
    add_force_flag(p)
    p.add_argument("--no-eval", action="store_true", help="skip test accuracy before/after")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")
    p.set_defaults(func=run)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["rounds=3", "normalize=none"]`` → ``{"rounds": 3, "normalize": "none"}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MippError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def build_method(args: argparse.Namespace) -> Method:
    """``make_method(args.method, **options)`` with every method option that was given."""
    options = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k) is not None}
    for key, value in parse_options(args.option).items():
        if key in options:
            raise MippError(f"{key} is given both as a flag and as --option; give it once")
        options[key] = value
    try:
        return make_method(args.method, **options)
    except TypeError as e:  # a value of the wrong kind, e.g. --option estimator=3
        raise MippError(str(e)) from None


def _options_text(options: dict[str, Any]) -> str:
    return escape(", ".join(f"{k} {v}" for k, v in options.items() if v is not None))


def check_args(args: argparse.Namespace) -> None:
    """The ranges :func:`mipp.prune` checks, checked before anything is loaded (one line)."""
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise MippError(f"sparsity must be in [0, 1), got {args.sparsity!r}")
    if not 0 < args.tolerance < 1:
        raise MippError(f"tolerance must be in (0, 1), got {args.tolerance!r}")


def run(args: argparse.Namespace) -> int:
    """``mipp prune``; under ``torchrun`` every rank streams its share of the calibration
    samples (:mod:`mipp.distributed`) and rank 0 alone prints, evaluates and writes."""
    return distributed_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    lead = distributed.rank() == 0
    console = make_console(quiet=not lead)
    inputs = [args.checkpoint, sidecar_path(args.checkpoint), args.match, args.data_root]
    rundir = run_directory(args.out, force=args.force, inputs=inputs) if lead else None
    method = build_method(args)
    ckpt = load_checkpoint(args.checkpoint)
    match = PruneReport.load(args.match) if args.match else None
    train_ds = checkpoint_data(ckpt, args.checkpoint, split="train", root=args.data_root)
    check_data_fits(ckpt, args.checkpoint, train_ds)
    if match is not None:
        try:
            check_match_model(match, ckpt.model, train_ds.x[:2])
        except MippError as e:
            raise MippError(f"--match {args.match}: {e}") from None
    calib_samples = min(args.calib_samples, len(train_ds))  # what the pipeline can draw
    test_ds = None
    if not args.no_eval and lead:
        test_ds = checkpoint_data(ckpt, args.checkpoint, split="test", root=args.data_root)
    mode = (
        f"sparsity {args.sparsity} of {args.target}"
        if args.sparsity is not None
        else f"the {args.target} sparsity of {args.match} "
        f"({match.achieved.get(args.target, math.nan):.4f})"
        if match is not None
        else f"confidence {args.confidence}"
        if args.confidence is not None
        else f"threshold {args.threshold}"
    )
    console.print(
        f"pruning [bold]{ckpt.spec.name}[/] with {method.name} "
        f"({_options_text(method.options())}), {mode}, "
        f"{calib_samples:,} calibration samples"
    )
    if calib_samples < args.calib_samples:
        console.print(
            f"[yellow]note:[/] --calib-samples {args.calib_samples:,} is more than the "
            f"{len(train_ds):,} training samples; using all {calib_samples:,}"
        )
    options = {
        "sparsity": args.sparsity,
        "target": args.target,
        "calib_samples": calib_samples,
        "scope": args.scope,
        "tolerance": args.tolerance,
        "compensate": args.compensate,
        "recalibrate_bn": args.recalibrate_bn,
        "seed": args.seed,
        "latency_batch": args.latency_batch,
        **({"allow_degenerate": True} if args.allow_degenerate else {}),
        **({"exclude": sorted(set(args.exclude))} if args.exclude else {}),
        **({"verify": False} if args.no_verify else {}),
    }
    show = lead and not args.no_progress
    with rendering(make_console(stderr=True), enabled=show) as progress:
        result = pipeline.prune(
            ckpt.model, train_ds, method=method, match=match, progress=progress, **options
        )
    report = result.report
    before = after = None
    if test_ds is not None:
        before = evaluate(ckpt.model, test_ds)
        after = evaluate(result.model, test_ds)
    defaults = inspect.signature(pipeline.prune).parameters
    run_config = {
        "command": "prune",
        "checkpoint": str(args.checkpoint),
        "method": {"name": method.name, "options": method.options()},
        "prune": {
            **options,
            "match": args.match,
            "batch_size": defaults["batch_size"].default,
        },
        "data_root": args.data_root,
        "evaluate": not args.no_eval,
        "mipp_version": __version__,
        "torch_version": torch.__version__,
    }
    metrics = {
        "method": report.method,
        "collapsed": report.collapsed,
        "achieved": report.achieved,
        "requested": report.requested,
        "target": report.target,
        "params": [report.params_before, report.params_after],
        "macs": [report.macs_before, report.macs_after],
        "units": [report.units_before, report.units_after],
        "widths": {g.name: [g.width_before, g.width_after] for g in report.groups},
        "timings": report.timings,
        "test_top1": None if before is None else [before.top1, after.top1],
    }
    extra = dict(ckpt.meta.get("extra", {}))
    extra.update(parent=str(args.checkpoint), pruned=metrics)
    if after is not None:
        extra["test_top1"] = after.top1
    if rundir is None:  # not rank 0: the same model, written by rank 0
        return 0
    with rundir as out:  # built under a temporary name, swapped into place at the end
        write_run_json(out / "config.json", run_config)
        report.save(out / "report.json")
        write_run_json(out / "metrics.json", metrics)
        save_checkpoint(
            out / "model.safetensors",
            result.model,
            spec=ckpt.spec,
            extra=extra,
            pruning=[*ckpt.meta.get("pruning", []), report.replay_record()],
        )
    path = Path(args.out) / "model.safetensors"
    console.print(_groups_table(report, ckpt.spec.name))
    rows = [
        ("units", f"{report.units_before:,}", f"{report.units_after:,}"),
        ("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
        ("MACs / sample", f"{report.macs_before:,}", f"{report.macs_after:,}"),
    ]
    if before is not None:
        rows.append(("test accuracy (one-shot)", f"{before.top1:.4f}", f"{after.top1:.4f}"))
    summary = Table(title="before / after")
    for col in ("", "before", "after"):
        summary.add_column(col, justify="right" if col else "left")
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    achieved = ", ".join(f"{k} {v:.4f}" for k, v in report.achieved.items())
    console.print(
        f"achieved sparsity: {achieved}; method time {report.work_seconds:.2f} s, "
        f"total {report.timings['total']:.2f} s"
    )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"saved {path} (+ model.json, config.json, report.json, metrics.json)")
    return 0


def _groups_table(report: PruneReport, model: str) -> Table:
    """Units per group, output → input; the last column is the information each group kept
    when the report measured it (MIPP), else whether the group collapsed."""
    measured = any(math.isfinite(g.info_full) for g in report.groups)
    last = "info kept" if measured else "collapsed"
    table = Table(title=f"{report.method} on {model}: units per layer (output -> input)")
    for col in ("group", "kind", "units before", "units after", last):
        table.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for g in report.groups:
        value = f"{g.retained:.3f}" if measured else ("yes" if g.collapsed else "")
        table.add_row(g.name, g.kind, str(g.width_before), str(g.width_after), value)
    return table
