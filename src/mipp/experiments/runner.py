"""Run a sweep: every cell of a :class:`~mipp.experiments.spec.SweepSpec`, resumably.

Layout of a sweep directory::

    sweep.json                    what was run: name, command, resolved config, protocol
    bases/<model>-<data>-seed<s>-<hash>/
        init.safetensors          the seeded initialisation (PaI starts here)
        trained.safetensors       the trained network (PaT starts here), trained once
        base.json                 its test accuracy and training time
    runs/<run_id>/
        config.json               the run's resolved settings
        report.json               the prune report (:class:`~mipp.report.PruneReport`)
        metrics.json              accuracies, sparsities, costs — written last
        error.txt                 only if the run failed (the sweep goes on)

A run is finished when its ``metrics.json`` exists; every file is written atomically
(temporary file + rename), so killing a sweep loses at most the run in flight, whose
directory is cleared and redone on the next invocation. A finished run whose stored settings
differ from the current config is an error (mixing protocols in one sweep would be silent
corruption); growing the grid (another seed, another sparsity) just adds runs.

Protocol, the same for every method of a sweep (also written into ``sweep.json``):

- one base network per (model, dataset, seed): initialised from ``seed``, trained with
  ``[train]``, cached;
- MIPP runs (``method = "mipp"`` and its variants) bisect their threshold to the requested
  sparsity; every other method is given the *reference* run's achieved sparsity (same
  model, dataset, regime, sparsity and seed) through ``match=``, so all remove the same
  share of units (within the tolerance);
- one-shot accuracy is measured right after pruning; then PaT fine-tunes for
  ``finetune.fraction × train.epochs`` epochs with the ``[finetune]`` recipe, and PaI trains
  the pruned initialisation from scratch with the ``[train]`` recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import mipp
from mipp import data as mdata
from mipp import models
from mipp.baselines import make_method
from mipp.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from mipp.config import TrainConfig
from mipp.errors import MippError
from mipp.experiments.spec import Run, SweepSpec, finetune_epochs
from mipp.prune import prune
from mipp.report import PruneReport
from mipp.train import evaluate, seeded, train
from mipp.types import ModelSpec

__all__ = ["SweepResult", "protocol", "run_sweep", "scoring_time"]


@dataclass
class SweepResult:
    """What one invocation of :func:`run_sweep` did."""

    out: Path
    total: int
    skipped: list[str] = field(default_factory=list)  # finished before this invocation
    done: list[str] = field(default_factory=list)  # finished by this invocation
    failed: dict[str, str] = field(default_factory=dict)  # run_id → error message


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _recipe(cfg: dict[str, Any], *, epochs: bool = True) -> str:
    t = TrainConfig.from_dict(cfg)
    sched = t.schedule
    if sched == "step":
        marks = ", ".join(f"{m:.2g}" for m in t.milestones)
        sched = f"step ×{t.gamma:g} at {marks} of the run"
    return (
        (f"{t.epochs} epoch(s), " if epochs else "")
        + f"{t.optimizer.upper()} lr {t.lr:g} ({sched}), momentum {t.momentum:g}, "
        f"weight decay {t.weight_decay:g}, batch {t.batch_size}"
    )


def protocol(spec: SweepSpec) -> list[str]:
    """The protocol of ``spec`` as markdown bullets (stored in ``sweep.json``, shown in
    ``REPORT.md``)."""
    cfg = spec.config
    d, p = cfg["data"], cfg["prune"]
    ft = {k: v for k, v in cfg["finetune"].items() if k != "fraction"}
    ft_epochs = finetune_epochs(cfg)
    ref = spec.reference
    subset = (
        f"a seeded subset of {d['train_subset']:,} training images"
        if d["train_subset"]
        else "the full training split"
    )
    test = f"{d['test_subset']:,} seeded test images" if d["test_subset"] else "the full test split"
    out = [
        f"Data: {subset}; accuracy on {test}"
        + (" (28×28 images zero-padded to 32×32)" if d["pad_to_32"] else "")
        + ".",
        f"Base networks: one per (model, dataset, seed), initialised from the seed and trained "
        f"once with {_recipe(cfg['train'])}; cached and shared by every method. Its test "
        f"accuracy is the dashed 'unpruned' line.",
        f"Pruning: requested share of {p['target']} removed in {spec.grid['sparsities']}, "
        f"calibration on {p['calib_samples']:,} seeded training samples (the same for every "
        f"method), scope '{p['scope']}'.",
    ]
    if ref is not None:
        out.append(
            f"Matched sparsity: MIPP runs bisect their threshold to the request (within "
            f"{p['tolerance']:g}); every other method is given the achieved {p['target']} "
            f"sparsity of the '{ref}' run with the same model, data, regime, request and seed, "
            f"so all methods remove the same share."
        )
    else:
        out.append("Every method prunes to the requested sparsity itself (no reference run).")
    out += [
        "One-shot accuracy: measured right after pruning, before any re-training (for PaI "
        "that is a pruned random initialisation, so about chance).",
        f"PaT (pruning after training): the pruned network is fine-tuned for {ft_epochs} "
        f"epoch(s) ({cfg['finetune']['fraction']:g} × the base epochs) with "
        f"{_recipe({**ft, 'epochs': ft_epochs}, epochs=False)}; the same budget for every "
        f"method.",
        f"PaI (pruning at initialisation): the seeded initialisation is pruned and the pruned "
        f"network trained from scratch with the base recipe ({_recipe(cfg['train'])}); the "
        f"same for every method.",
        "Cost: prune_s is the method's own work (MIPP: activation capture, statistics and "
        "selection including the bisection; baselines: scoring and allocation), measured in "
        "the same sweep on the same machine.",
        f"Seeds: {spec.grid['seeds']} (model initialisation, data order, calibration subset); "
        f"error bars are the sample standard deviation over seeds.",
    ]
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class _Data:
    """Train/test splits per dataset, loaded on first use and kept."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.cache: dict[str, tuple[mdata.ImageDataset, mdata.ImageDataset]] = {}

    def __call__(self, name: str):
        if name not in self.cache:
            d = self.cfg
            opts = {"pad_to_32": d["pad_to_32"], "channels": d["channels"]}
            if mdata.DATASETS[name].size is None:
                opts = {}
            splits = []
            for split, key in (("train", "train_subset"), ("test", "test_subset")):
                ds = mdata.load_dataset(name, split=split, **opts)
                if d[key] and d[key] < len(ds):
                    g = torch.Generator().manual_seed(0)
                    ds = ds.subset(torch.randperm(len(ds), generator=g)[: d[key]].sort().values)
                splits.append(ds)
            self.cache[name] = (splits[0], splits[1])
        return self.cache[name]


def _model_spec(cfg: dict[str, Any], model: str, ds: mdata.ImageDataset) -> ModelSpec:
    widths = cfg["models"].get(model, {}).get("widths")
    return ModelSpec(
        model,
        num_classes=ds.num_classes,
        in_channels=ds.in_channels,  # the feature count of vector data (with input_size 1)
        input_size=ds.input_size or 1,
        widths=widths,
    )


class _Bases:
    """The seeded initialisation and trained base network per (model, dataset, seed)."""

    def __init__(self, out: Path, spec: SweepSpec, data: _Data, device, console: Console):
        self.out, self.spec, self.data, self.device, self.console = out, spec, data, device, console

    def key(self, model: str, dataset: str, seed: int) -> dict[str, Any]:
        cfg = self.spec.config
        return {
            "model": model,
            "dataset": dataset,
            "seed": seed,
            "data": cfg["data"],
            "model_options": cfg["models"].get(model, {}),
            "train": cfg["train"],
        }

    def dir(self, model: str, dataset: str, seed: int) -> Path:
        key = self.key(model, dataset, seed)
        return self.out / "bases" / f"{model}-{dataset}-seed{seed}-{_hash(key)}"

    def get(self, model: str, dataset: str, seed: int, which: str) -> tuple[torch.nn.Module, float]:
        """(a fresh copy of the ``"init"`` or ``"trained"`` network, the base accuracy)."""
        d = self.dir(model, dataset, seed)
        meta = _read_json(d / "base.json")
        if meta is None:
            meta = self._build(model, dataset, seed, d)
        net = load_checkpoint(d / f"{which}.safetensors").model.to(self.device)
        return net, meta["accuracy"]

    def _build(self, model: str, dataset: str, seed: int, d: Path) -> dict[str, Any]:
        train_ds, test_ds = self.data(dataset)
        mspec = _model_spec(self.spec.config, model, train_ds)
        with seeded(seed):
            net = models.create(
                model,
                num_classes=mspec.num_classes,
                in_channels=mspec.in_channels,
                input_size=mspec.input_size,
                widths=mspec.widths,
            )
        save_checkpoint(d / "init.safetensors", net, spec=mspec)
        tcfg = TrainConfig.from_dict({**self.spec.config["train"], "seed": seed})
        self.console.print(
            f"training the base {model} on {dataset} (seed {seed}, {tcfg.epochs} epochs, "
            f"{len(train_ds):,} images) ..."
        )
        net = net.to(self.device)
        t = time.perf_counter()
        train(net, train_ds, tcfg, device=self.device, progress=self.console.is_terminal)
        seconds = time.perf_counter() - t
        acc = evaluate(net, test_ds, device=self.device).top1
        save_checkpoint(d / "trained.safetensors", net, spec=mspec)
        meta = {**self.key(model, dataset, seed), "accuracy": acc, "train_s": seconds}
        _write_json(d / "base.json", meta)
        self.console.print(f"  base accuracy {acc:.4f} after {seconds:.1f} s")
        return meta


def _identity(run: Run) -> dict[str, Any]:
    """run_id, model, dataset, regime, method (label), sparsity and seed of a run."""
    return {"run_id": run.run_id, **asdict(run)}


def run_config(spec: SweepSpec, run: Run) -> dict[str, Any]:
    """The settings a run depends on (stored as its ``config.json``, checked on resume)."""
    cfg = spec.config
    return {
        **_identity(run),
        "method_options": spec.method(run.method),
        "reference": _reference(spec, run),
        "data": cfg["data"],
        "model_options": cfg["models"].get(run.model, {}),
        "prune": cfg["prune"],
        "train": cfg["train"],
        "finetune": {**cfg["finetune"], "epochs": finetune_epochs(cfg)},
    }


def _reference(spec: SweepSpec, run: Run) -> str | None:
    """The label whose report ``run`` matches, or None if it targets the request itself."""
    if spec.method(run.method)["method"] == "mipp" or spec.reference is None:
        return None
    return spec.reference


def scoring_time(report: PruneReport) -> float:
    """The method's own work in a report: MIPP capture + statistics + selection, a baseline's
    scoring + allocation (IMP's re-training and the removal excluded)."""
    t = report.timings
    if report.method == "mipp":
        return t.get("capture", 0.0) + t.get("statistics", 0.0) + t.get("selection", 0.0)
    return t.get("scoring", 0.0) + t.get("allocation", 0.0)


def _prune(spec: SweepSpec, run: Run, net, train_ds, ref: PruneReport | None):
    p = spec.config["prune"]
    opts = spec.method(run.method)
    name = opts.pop("method")
    common = {
        "target": p["target"],
        "calib_samples": opts.pop("calib_samples", p["calib_samples"]),
        "tolerance": p["tolerance"],
        "batch_size": p["batch_size"],
        "scope": p["scope"],
        "seed": run.seed,
        "compensate": opts.pop("compensate", False),
        "recalibrate_bn": opts.pop("recalibrate_bn", False),
    }
    if name == "mipp":
        return prune(net, train_ds, sparsity=run.sparsity, **common, **opts)
    method = make_method(name, **opts.pop("options", {}))
    if ref is None:
        return prune(net, train_ds, method=method, sparsity=run.sparsity, **common, **opts)
    return prune(net, train_ds, method=method, match=ref, **common, **opts)


def _execute(spec, run, rdir, bases, data, device, ref) -> dict[str, Any]:
    train_ds, test_ds = data(run.dataset)
    which = "trained" if run.regime == "pat" else "init"
    net, base_acc = bases.get(run.model, run.dataset, run.seed, which)
    result = _prune(spec, run, net, train_ds, ref)
    report = result.report
    report.save(rdir / "report.json")
    pruned = result.model
    one_shot = evaluate(pruned, test_ds, device=device).top1
    cfg = spec.config
    if run.regime == "pat":
        ft = {k: v for k, v in cfg["finetune"].items() if k != "fraction"}
        tcfg = TrainConfig.from_dict({**ft, "epochs": finetune_epochs(cfg), "seed": run.seed})
    else:
        tcfg = TrainConfig.from_dict({**cfg["train"], "seed": run.seed})
    t = time.perf_counter()
    train(pruned, train_ds, tcfg, device=device, progress=False)
    retrain_s = time.perf_counter() - t
    final = evaluate(pruned, test_ds, device=device)
    groups = list(reversed(report.groups))  # reports walk output → input
    return {
        **_identity(run),
        "method_name": report.method,
        "reference": _reference(spec, run),
        "target": report.target,
        "units_removed": report.achieved.get("units"),
        "params_removed": report.achieved.get("params"),
        "macs_removed": report.achieved.get("macs"),
        "units_before": report.units_before,
        "units_after": report.units_after,
        "params": report.params_after,
        "params_before": report.params_before,
        "macs": report.macs_after,
        "macs_before": report.macs_before,
        "accuracy_base": base_acc,
        "accuracy_one_shot": one_shot,
        "accuracy_final": final.top1,
        "loss_final": final.loss,
        "collapsed": list(report.collapsed),
        "layers": [
            {"name": g.name, "before": g.width_before, "after": g.width_after} for g in groups
        ],
        "prune_s": scoring_time(report),
        "prune_total_s": report.timings.get("total", 0.0),
        "retrain_s": retrain_s,
        "final_epochs": tcfg.epochs,
        "extra_training_epochs": 0,
        "notes": list(report.notes),
    }


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_finished(spec: SweepSpec, run: Run, rdir: Path) -> bool:
    """Is ``run`` finished (metrics.json readable)? Raise if it was made differently."""
    if _read_json(rdir / "metrics.json") is None:
        return False
    stored = _read_json(rdir / "config.json")
    now = json.loads(json.dumps(run_config(spec, run)))
    if stored != now:
        diff = sorted(k for k in set(now) | set(stored or {}) if (stored or {}).get(k) != now[k])
        raise MippError(
            f"run {run.run_id} in {rdir.parent.parent} was made with different settings "
            f"({', '.join(diff)}); use a new --out directory for a changed protocol, or "
            f"delete that run's directory to redo it"
        )
    return True


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    command: str | None = None,
    console: Console | None = None,
    on_run_done: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every unfinished run of ``spec`` into ``out`` (see the module docstring).

    Failed runs are recorded (``error.txt``) and the sweep goes on; runs that need a failed
    reference fail too. ``on_run_done(run_id)`` is called after each finished run.
    """
    out = Path(out)
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    device = torch.device(device)
    runs = spec.runs()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    old = _read_json(out / "sweep.json") or {}
    meta = {
        "name": spec.name,
        "config_name": spec.config_name,
        "profile": spec.profile,
        "config_path": spec.path,
        "command": command or old.get("command"),
        "description": spec.config["description"],
        "protocol": protocol(spec),
        "config": spec.config,
        "total_runs": len(runs),
        "mipp_version": mipp.__version__,
        "started": old.get("started", time.strftime("%Y-%m-%d %H:%M:%S")),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_json(out / "sweep.json", meta)
    result = SweepResult(out=out, total=len(runs))
    pending = []
    for run in runs:
        if _check_finished(spec, run, out / "runs" / run.run_id):
            result.skipped.append(run.run_id)
        else:
            pending.append(run)
    console.print(
        f"sweep {spec.name}: {len(runs)} runs, {len(result.skipped)} already finished, "
        f"{len(pending)} to go → {out}"
    )
    data = _Data(spec.config["data"])
    for name in dict.fromkeys(r.dataset for r in pending):  # a missing dataset fails now
        data(name)
    bases = _Bases(out, spec, data, device, console)
    t0 = time.perf_counter()
    for i, run in enumerate(pending, 1):
        rdir = out / "runs" / run.run_id
        if rdir.exists():  # an interrupted or failed attempt: start clean
            shutil.rmtree(rdir)
        rdir.mkdir(parents=True)
        _write_json(rdir / "config.json", run_config(spec, run))
        ref = None
        label = _reference(spec, run)
        try:
            if label is not None:
                ref_id = Run(run.model, run.dataset, run.regime, label, run.sparsity, run.seed)
                ref_path = out / "runs" / ref_id.run_id / "report.json"
                if _read_json(ref_path.with_name("metrics.json")) is None:
                    raise MippError(f"its reference run {ref_id.run_id} did not finish")
                ref = PruneReport.load(ref_path)
            t = time.perf_counter()
            metrics = _execute(spec, run, rdir, bases, data, device, ref)
            metrics["run_s"] = time.perf_counter() - t
        except (KeyboardInterrupt, SystemExit):
            console.print(
                f"interrupted during {run.run_id}: {len(result.skipped) + len(result.done)} of "
                f"{len(runs)} runs finished; run the same command again to resume"
            )
            raise
        except Exception as e:  # record, go on with the other runs
            msg = f"{type(e).__name__}: {e}"
            atomic_write_bytes(rdir / "error.txt", traceback.format_exc().encode())
            result.failed[run.run_id] = msg
            console.print(f"[{i}/{len(pending)}] {run.run_id} FAILED: {msg}")
            continue
        _write_json(rdir / "metrics.json", metrics)
        result.done.append(run.run_id)
        elapsed = time.perf_counter() - t0
        eta = elapsed / i * (len(pending) - i)
        console.print(
            f"[{len(result.skipped) + len(result.done)}/{len(runs)}] {run.run_id}: "
            f"{metrics['units_removed']:.1%} units removed, one-shot "
            f"{metrics['accuracy_one_shot']:.4f}, final {metrics['accuracy_final']:.4f} "
            f"({metrics['run_s']:.1f} s; elapsed {_eta(elapsed)}, ETA {_eta(eta)})"
        )
        if on_run_done is not None:
            on_run_done(run.run_id)
    if result.failed:
        console.print(
            f"{len(result.failed)} run(s) failed (see runs/<id>/error.txt): "
            + ", ".join(result.failed)
        )
    return result
