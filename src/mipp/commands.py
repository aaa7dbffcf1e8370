"""Implementations of the ``mipp`` subcommands (the parser lives in :mod:`mipp.cli`).

Each ``cmd_*`` takes the parsed arguments, prints tables with rich, writes its run directory,
and returns an exit status. Errors are raised as exceptions; :func:`mipp.cli.main` turns
them into one line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mipp import __version__, data, models
from mipp.checkpoint import (
    Checkpoint,
    atomic_write_bytes,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from mipp.config import TrainConfig
from mipp.errors import MippError
from mipp.metrics import (
    compare_latency,
    count_macs,
    count_params,
    layer_widths,
    measure_latency,
)
from mipp.train import evaluate, seeded, train
from mipp.types import ModelSpec

# ----------------------------------------------------------------------------- helpers


def _console() -> Console:
    return Console(highlight=False)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


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
    if args.what in ("methods", "all"):
        from mipp.baselines import METHODS

        table = Table(title="pruning methods (mipp prune --method NAME)")
        for col in ("name", "allocation", "labels", "description"):
            table.add_column(col)
        table.add_row("mipp", "its own", "no", "Mutual Information Preserving Pruning (default)")
        for name, cls in METHODS.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            labels = "yes" if cls.needs_labels else "no"
            table.add_row(name, cls.default_allocation, labels, doc)
        console.print(table)
    return 0


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
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


def _checkpoint_data(
    ckpt: Checkpoint, path: str, *, split: str, root: str | None
) -> data.ImageDataset:
    """The split of the dataset a checkpoint was trained on (recorded in its sidecar)."""
    ds_meta = ckpt.meta.get("extra", {}).get("dataset", {})
    if not ds_meta.get("name"):
        raise MippError(f"{path} does not record the dataset it was trained on")
    return _load_data(
        ds_meta["name"],
        split=split,
        root=root or ds_meta.get("root"),
        pad_to_32=ds_meta.get("pad_to_32", False),
        channels=ds_meta.get("channels"),
    )


def cmd_train(args: argparse.Namespace) -> int:
    console = _console()
    out = Path(args.out)
    config = _train_config(args)
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


def _fmt_ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def _method_options(items: list[str]) -> dict[str, Any]:
    """``["rounds=3", "normalize=none"]`` → ``{"rounds": 3, "normalize": "none"}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MippError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def cmd_prune(args: argparse.Namespace) -> int:
    from mipp.baselines import make_method
    from mipp.prune import prune
    from mipp.report import PruneReport

    console = _console()
    out = Path(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    method: Any = "mipp"
    if args.method != "mipp":
        method = make_method(args.method, **_method_options(args.option))
    elif args.option:
        raise MippError("--option sets a baseline's options; MIPP's are its own flags")
    match = PruneReport.load(args.match) if args.match else None
    train_ds = _checkpoint_data(ckpt, args.checkpoint, split="train", root=args.data_root)
    test_ds = None
    if not args.no_eval:
        test_ds = _checkpoint_data(ckpt, args.checkpoint, split="test", root=args.data_root)
    mode = (
        f"sparsity {args.sparsity} of {args.target}"
        if args.sparsity is not None
        else f"the {args.target} sparsity of {args.match} "
        f"({match.achieved.get(args.target, float('nan')):.4f})"
        if match is not None
        else f"confidence {args.confidence}"
        if args.confidence is not None
        else f"threshold {args.threshold}"
    )
    what = (
        f"MIPP ({args.estimator or 'linear'} estimator"
        if args.method == "mipp"
        else f"{args.method} ({args.allocation or method.default_allocation} allocation"
    )
    console.print(
        f"pruning [bold]{ckpt.spec.name}[/] with {what}, {mode}, "
        f"{args.calib_samples} calibration samples)"
    )
    result = prune(
        ckpt.model,
        train_ds,
        method=method,
        sparsity=args.sparsity,
        match=match,
        confidence=args.confidence,
        threshold=args.threshold,
        target=args.target,
        allocation=args.allocation,
        estimator=args.estimator,
        pool=args.pool,
        calib_samples=args.calib_samples,
        scope=args.scope,
        min_keep=args.min_keep,
        order=args.order,
        tolerance=args.tolerance,
        compensate=args.compensate,
        recalibrate_bn=args.recalibrate_bn,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = result.report
    before = after = None
    if test_ds is not None:
        before = evaluate(ckpt.model, test_ds)
        after = evaluate(result.model, test_ds)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "report.json")
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
    _write_json(out / "metrics.json", metrics)
    extra = dict(ckpt.meta.get("extra", {}))
    extra.update(parent=str(args.checkpoint), pruned=metrics)
    if after is not None:
        extra["test_top1"] = after.top1
    path = save_checkpoint(
        out / "model.safetensors",
        result.model,
        spec=ckpt.spec,
        extra=extra,
        pruning=[*ckpt.meta.get("pruning", []), report.replay_record()],
    )
    last = "info kept" if report.method == "mipp" else "collapsed"
    table = Table(title=f"{report.method} on {ckpt.spec.name}: units per layer (output -> input)")
    for col in ("group", "kind", "units before", "units after", last):
        table.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for g in report.groups:
        extra = f"{g.retained:.3f}" if report.method == "mipp" else ("yes" if g.collapsed else "")
        table.add_row(g.name, g.kind, str(g.width_before), str(g.width_after), extra)
    console.print(table)
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
        f"achieved sparsity: {achieved}; "
        f"{'selection' if report.method == 'mipp' else 'scoring'} "
        f"{report.timings.get('selection', report.timings.get('scoring', 0.0)):.2f} s, "
        f"total {report.timings['total']:.2f} s"
    )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"saved {path} (+ model.json, report.json, metrics.json)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    console = _console()
    out = Path(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    config = _train_config(args)
    full = _checkpoint_data(ckpt, args.checkpoint, split="train", root=args.data_root)
    test = _checkpoint_data(ckpt, args.checkpoint, split="test", root=args.data_root)
    if args.val_fraction > 0:
        train_ds, val_ds = data.train_val_split(
            full, val_fraction=args.val_fraction, seed=args.seed
        )
    else:
        train_ds, val_ds = full, None
    before = evaluate(ckpt.model, test)
    console.print(
        f"fine-tuning [bold]{ckpt.spec.name}[/] ({count_params(ckpt.model):,} params) for "
        f"{config.epochs} epoch(s); test accuracy before {before.top1:.4f}"
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / "config.json",
        {
            "command": "finetune",
            "checkpoint": str(args.checkpoint),
            "train": config.to_dict(),
            "mipp_version": __version__,
            "device": args.device,
        },
    )
    history = train(
        ckpt.model,
        train_ds,
        config,
        val_data=val_ds,
        device=args.device,
        progress=not args.no_progress,
    )
    ckpt.model.to("cpu")
    after = evaluate(ckpt.model, test)
    metrics = {
        "test_top1_before": before.top1,
        "test_top1": after.top1,
        "test_loss": after.loss,
        "train_seconds": history.seconds,
        "history": history.to_dict()["epochs"],
        "params": count_params(ckpt.model),
    }
    _write_json(out / "metrics.json", metrics)
    extra = dict(ckpt.meta.get("extra", {}))
    extra.update(parent=str(args.checkpoint), finetune=config.to_dict(), test_top1=after.top1)
    path = save_checkpoint(
        out / "model.safetensors",
        ckpt.model,
        spec=ckpt.spec,
        extra=extra,
        pruning=ckpt.meta.get("pruning", []),
    )
    console.print(
        _size_table(
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


def cmd_compare(args: argparse.Namespace) -> int:
    console = _console()
    rows: list[dict[str, Any]] = []
    loaded = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        test = _checkpoint_data(ckpt, path, split="test", root=args.data_root)
        result = evaluate(ckpt.model, test)
        numbers = _model_numbers(ckpt.model, _input_shape(test), latency_repeats=0)
        rows.append({"checkpoint": str(path), "test_top1": result.top1, **numbers})
        loaded.append(ckpt.model)
    if args.latency_repeats > 0:  # side by side, so the ratios hold on a busy machine
        timings = compare_latency(loaded, _input_shape(test), repeats=args.latency_repeats)
        for row, lat in zip(rows, timings, strict=True):
            row["latency_ms"] = {str(b): r.median_ms for b, r in lat.items()}
    ref = rows[0]
    table = Table(title="comparison (ratios against the first checkpoint)")
    table.add_column("")
    for r in rows:
        table.add_column(Path(r["checkpoint"]).parent.name or r["checkpoint"], justify="right")
    table.add_row("test accuracy", *(f"{r['test_top1']:.4f}" for r in rows))
    table.add_row("parameters", *(f"{r['params']:,}" for r in rows))
    table.add_row("  ratio", *(_fmt_ratio(ref["params"], r["params"]) for r in rows))
    table.add_row("MACs / sample", *(f"{r['macs']:,}" for r in rows))
    table.add_row("  ratio", *(_fmt_ratio(ref["macs"], r["macs"]) for r in rows))
    for b in ("1", "64"):
        if "latency_ms" in ref:
            table.add_row(
                f"CPU latency b{b} (median)",
                *(f"{r['latency_ms'][b]:.2f} ms" for r in rows),
            )
            table.add_row(
                "  speed-up", *(_fmt_ratio(r["latency_ms"][b], ref["latency_ms"][b]) for r in rows)
            )
    console.print(table)
    widths = Table(title="units per layer")
    widths.add_column("layer")
    for r in rows:
        widths.add_column(Path(r["checkpoint"]).parent.name or r["checkpoint"], justify="right")
    for layer in ref["widths"]:
        widths.add_row(layer, *(str(r["widths"].get(layer, "-")) for r in rows))
    console.print(widths)
    if args.json:
        print(json.dumps(rows))
    return 0
