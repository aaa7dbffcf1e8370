"""Run a sweep: every cell of a :class:`~mipp.experiments.spec.SweepSpec`, resumably.

Layout of a sweep directory::

    sweep.json                    what was run: name, command, resolved config, protocol
    .mipp.lock                    held (flock) while a sweep runs here
    bases/<model>-<data>-seed<s>-<hash>/   (unless ``bases=`` names a shared cache)
        init.safetensors          the seeded initialisation (PaI starts here)
        trained.safetensors       the trained network (PaT starts here), trained once
        base.json                 its test accuracy and training time
        .mipp.lock                held while one process trains it: another sweep sharing
                                  the cache waits for that base instead of training it too
    runs/<run_id>/
        config.json               the run's resolved settings
        report.json               the prune report (:class:`~mipp.report.PruneReport`)
        metrics.json              accuracies, sparsities, costs and what made them (mipp
                                  version, source revision, torch, threads) — written last
        error.txt                 only if the run failed (the sweep goes on)

A run is finished when its ``metrics.json`` exists; every file is written atomically
(temporary file + rename), so killing a sweep loses at most the run in flight, whose
directory is cleared and redone on the next invocation. A finished run whose stored settings
differ from the current config is an error (mixing protocols in one sweep would be silent
corruption); growing the grid (another seed, another sparsity) just adds runs. A running
sweep holds a lock on its directory (:func:`mipp._io.lock_directory`): a second sweep on the
same directory fails at once with :class:`~mipp._io.DirectoryLockedError`; the lock goes
with the process, however it ends.

Protocol, the same for every method of a sweep (also written into ``sweep.json``):

- one base network per (model, dataset, seed): initialised from ``seed``, trained with
  ``[train]``, cached;
- MIPP runs (``method = "mipp"`` and its variants) bisect their threshold to the requested
  sparsity; every other method is given the *reference* run's achieved sparsity (same
  model, dataset, regime, sparsity and seed) through ``match=``, so all remove the same
  share of units (within the tolerance);
- one-shot accuracy is measured right after pruning; then PaT fine-tunes for
  ``finetune.fraction × train.epochs`` epochs with the ``[finetune]`` recipe, and PaI trains
  the pruned initialisation from scratch with the ``[train]`` recipe (one
  :func:`~mipp.experiments.cell.run_cell` per run).

Progress goes to ``progress=`` (:class:`~mipp.progress.ProgressEvent` objects: stage
``"sweep"`` for the runs finished out of the total, with the elapsed time and an ETA;
``"base"`` for the base networks, whose training events are passed on as they come) and to
the logger ``mipp.experiments.runner``. Nothing is drawn here.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import mipp
from mipp._io import atomic_write_bytes, lock_directory, read_json, write_json
from mipp.errors import MippError
from mipp.experiments.bases import Bases, SweepData
from mipp.experiments.cell import run_cell
from mipp.experiments.spec import Run, SweepSpec, finetune_epochs
from mipp.progress import ProgressCallback, Reporter
from mipp.report import PruneReport
from mipp.zoo.config import TrainConfig

__all__ = [
    "SweepResult",
    "attempt",
    "protocol",
    "provenance",
    "run_config",
    "run_sweep",
    "source_revision",
    "train_bases",
]


def source_revision(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout holding ``path`` (default: mipp's own source), with
    ``+dirty`` when tracked files under ``path`` differ from it; ``None`` when ``path`` is
    not in a git checkout or git is missing (an installed wheel). For mipp's own source the
    answer is read once per process, when the code was loaded, not as the files change
    later under a running sweep."""
    if path is None:
        return _own_revision()
    path = Path(path)
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


@functools.lru_cache(maxsize=1)
def _own_revision() -> str | None:
    return source_revision(Path(mipp.__file__).parent)


def provenance() -> dict[str, Any]:
    """What makes a run in this process: mipp's version and source revision
    (:func:`source_revision`), torch's version and its CPU threads. Recorded in every run's
    ``metrics.json`` (so runs.csv) and in ``sweep.json`` for the invocation."""
    return {
        "mipp_version": mipp.__version__,
        "source": source_revision(),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


@dataclass
class SweepResult:
    """What one invocation of :func:`run_sweep` did."""

    out: Path
    total: int
    skipped: list[str] = field(default_factory=list)  # finished before this invocation
    done: list[str] = field(default_factory=list)  # finished by this invocation
    failed: dict[str, str] = field(default_factory=dict)  # run_id → error message


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
    ft = {k: v for k, v in cfg["finetune"].items() if k not in ("fraction", "epochs")}
    ft_epochs = finetune_epochs(cfg)
    budget = (
        f"{cfg['finetune']['fraction']:g} × the base epochs"
        if "fraction" in cfg["finetune"]
        else "a fixed budget"
    )
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
        f"epoch(s) ({budget}) with "
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


def _identity(run: Run) -> dict[str, Any]:
    """run_id, model, dataset, regime, method (label), sparsity and seed of a run."""
    return {"run_id": run.run_id, **asdict(run)}


def run_config(spec: SweepSpec, run: Run) -> dict[str, Any]:
    """The settings a run depends on (stored as its ``config.json``, checked on resume)."""
    cfg = spec.config
    out = {
        **_identity(run),
        "method_options": spec.variant(run.method),
        "reference": spec.reference_for(run.method),
        "data": cfg["data"],
        "model_options": cfg["models"].get(run.model, {}),
        "prune": cfg["prune"],
        "train": cfg["train"],
        "finetune": {**cfg["finetune"], "epochs": finetune_epochs(cfg)},
    }
    folder = SweepData(cfg["data"], cfg["folders"]).folder(run.dataset)
    if folder is not None:  # (in-memory datasets: the key is absent, as before)
        out["folder"] = folder
    return out


def _retrain_config(spec: SweepSpec, run: Run) -> TrainConfig:
    """PaT: the ``[finetune]`` recipe for ``finetune_epochs``; PaI: the ``[train]`` recipe."""
    cfg = spec.config
    if run.regime == "pat":
        ft = {k: v for k, v in cfg["finetune"].items() if k not in ("fraction", "epochs")}
        return TrainConfig.from_dict({**ft, "epochs": finetune_epochs(cfg), "seed": run.seed})
    return TrainConfig.from_dict({**cfg["train"], "seed": run.seed})


def _execute(
    spec: SweepSpec,
    run: Run,
    rdir: Path,
    bases: Bases,
    data: SweepData,
    device: torch.device,
    ref: PruneReport | None,
) -> dict[str, Any]:
    train_ds, test_ds = data(run.dataset)
    which = "trained" if run.regime == "pat" else "init"
    net, base_acc = bases.get(run.model, run.dataset, run.seed, which)
    method, pipeline = spec.method(run.method)
    tcfg = _retrain_config(spec, run)
    calib = data.calibration(
        run.dataset, pipeline["calib_samples"], seed=run.seed, batch_size=pipeline["batch_size"]
    )
    cell = run_cell(
        net,
        train_ds,
        test_ds,
        method=method,
        retrain=tcfg,
        device=device,
        sparsity=None if ref is not None else run.sparsity,
        match=ref,
        seed=run.seed,
        calib_data=calib,
        num_workers=data.workers(run.dataset),
        **pipeline,
    )
    report = cell.report
    report.save(rdir / "report.json")
    groups = list(reversed(report.groups))  # reports walk output → input
    return {
        **_identity(run),
        "method_name": report.method,
        "reference": spec.reference_for(run.method),
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
        "accuracy_one_shot": cell.one_shot,
        "accuracy_final": cell.final.top1,
        "loss_final": cell.final.loss,
        "collapsed": list(report.collapsed),
        "layers": [
            {"name": g.name, "before": g.width_before, "after": g.width_after} for g in groups
        ],
        "prune_s": report.work_seconds,
        "prune_total_s": report.timings.get("total", 0.0),
        "retrain_s": cell.retrain_s,
        "final_epochs": tcfg.epochs,
        "extra_training_epochs": cell.extra_training_epochs,
        "notes": list(report.notes),
        "repair": bool(report.options.get("compensate", False)),
    }


def attempt(
    spec: SweepSpec,
    run: Run,
    out: Path,
    bases: Bases,
    data: SweepData,
    device: torch.device,
) -> tuple[dict[str, Any] | None, str | None]:
    """One run into ``out/runs/<run_id>``, from a clean directory: ``(metrics, None)`` once
    its ``metrics.json`` is written, or ``(None, "Type: message")`` with ``error.txt``
    written (the failure, or a reference run that did not finish). Used by every executor;
    ``KeyboardInterrupt`` / ``SystemExit`` propagate."""
    rdir = out / "runs" / run.run_id
    if rdir.exists():  # an interrupted or failed attempt: start clean
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True)
    write_json(rdir / "config.json", run_config(spec, run))
    label = spec.reference_for(run.method)
    try:
        ref = None
        if label is not None:
            ref_id = Run(run.model, run.dataset, run.regime, label, run.sparsity, run.seed)
            ref_path = out / "runs" / ref_id.run_id / "report.json"
            if read_json(ref_path.with_name("metrics.json")) is None:
                raise MippError(f"its reference run {ref_id.run_id} did not finish")
            ref = PruneReport.load(ref_path)
        t = time.perf_counter()
        metrics = _execute(spec, run, rdir, bases, data, device, ref)
        metrics["run_s"] = time.perf_counter() - t
        metrics.update(provenance())
    except Exception as e:  # recorded; the sweep goes on with the other runs
        atomic_write_bytes(rdir / "error.txt", traceback.format_exc().encode())
        return None, f"{type(e).__name__}: {e}"
    write_json(rdir / "metrics.json", metrics)
    return metrics, None


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_finished(spec: SweepSpec, run: Run, rdir: Path) -> bool:
    """Is ``run`` finished (metrics.json readable)? Raise if it was made differently."""
    if read_json(rdir / "metrics.json") is None:
        return False
    stored = read_json(rdir / "config.json")
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
    progress: ProgressCallback | None = None,
    on_run_done: Callable[[str], None] | None = None,
    bases: str | Path | None = None,
    executor: Any = None,
) -> SweepResult:
    """Run every unfinished run of ``spec`` into ``out`` (see the module docstring).

    ``executor``: None runs the runs one after another in this process; a
    :class:`~mipp.experiments.ray_executor.RayExecutor` submits them as Ray tasks (the same
    directory layout, resumability, progress and failure records).

    Failed runs are recorded (``error.txt``) and the sweep goes on; runs that need a failed
    reference fail too. ``progress`` receives the sweep's events (see the module
    docstring); ``on_run_done(run_id)`` is called after each finished run. ``bases`` is the
    base-network cache directory (default ``out/bases``); a shared one lets every sweep of
    the same (model, data, recipe, seed) reuse one trained base.

    Raises :class:`~mipp._io.DirectoryLockedError` at once when another sweep is running in
    ``out``.
    """
    out = Path(out)
    with lock_directory(out, what="sweep directory"):
        return _run_sweep(spec, out, device, command, progress, on_run_done, bases, executor)


def train_bases(
    spec: SweepSpec,
    bases: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Train every base network ``spec``'s runs need that the cache ``bases`` lacks, and
    nothing else; the base directories, one per (model, dataset, seed).

    Bases another process is training are passed over and waited for at the end, so N
    processes running this on one cache train N bases at once (``mipp sweep --bases-only``);
    the sweep that follows finds them all trained.
    """
    report = Reporter(progress, __name__)
    data = SweepData(spec.config["data"], spec.config["folders"])
    keys = [(r.model, r.dataset, r.seed) for r in spec.runs()]
    for name in dict.fromkeys(k[1] for k in keys):  # a missing dataset fails now
        data(name)
    cache = Bases(Path(bases), spec, data, torch.device(device), report)
    return cache.train_missing(keys)


def _run_sweep(
    spec: SweepSpec,
    out: Path,
    device: str | torch.device,
    command: str | None,
    progress: ProgressCallback | None,
    on_run_done: Callable[[str], None] | None,
    bases: str | Path | None,
    executor: Any,
) -> SweepResult:
    report = Reporter(progress, __name__)
    device = torch.device(device)
    runs = spec.runs()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    old = read_json(out / "sweep.json") or {}
    bases_dir = Path(bases) if bases is not None else out / "bases"
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
        "bases": str(bases_dir),
        **provenance(),
        "started": old.get("started", time.strftime("%Y-%m-%d %H:%M:%S")),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(out / "sweep.json", meta)
    result = SweepResult(out=out, total=len(runs))
    pending = []
    for run in runs:
        if _check_finished(spec, run, out / "runs" / run.run_id):
            result.skipped.append(run.run_id)
        else:
            pending.append(run)
    report(
        "sweep",
        f"sweep {spec.name}: {len(runs)} runs, {len(result.skipped)} already finished, "
        f"{len(pending)} to go → {out}",
        done=len(result.skipped),
        total=len(runs),
        out=str(out),
    )
    data = SweepData(spec.config["data"], spec.config["folders"])
    for name in dict.fromkeys(r.dataset for r in pending):  # a missing dataset fails now
        data(name)
    t0 = time.perf_counter()
    count = [0]  # runs attempted in this invocation (for the ETA)

    def record(run: Run, metrics: dict[str, Any] | None, error: str | None) -> None:
        """Book one attempted run: progress with the ETA, the failure, the callback."""
        count[0] += 1
        finished = len(result.skipped) + len(result.done)
        if error is not None:
            result.failed[run.run_id] = error
            report(
                "sweep",
                f"[{count[0]}/{len(pending)}] {run.run_id} FAILED: {error}",
                done=finished,
                total=len(runs),
                run_id=run.run_id,
                error=error,
            )
            return
        result.done.append(run.run_id)
        elapsed = time.perf_counter() - t0
        eta = elapsed / count[0] * (len(pending) - count[0])
        finished += 1
        report(
            "sweep",
            f"[{finished}/{len(runs)}] {run.run_id}: "
            f"{metrics['units_removed']:.1%} units removed, one-shot "
            f"{metrics['accuracy_one_shot']:.4f}, final {metrics['accuracy_final']:.4f} "
            f"({metrics['run_s']:.1f} s; elapsed {_eta(elapsed)}, ETA {_eta(eta)})",
            done=finished,
            total=len(runs),
            run_id=run.run_id,
            units_removed=metrics["units_removed"],
            accuracy_one_shot=metrics["accuracy_one_shot"],
            accuracy_final=metrics["accuracy_final"],
            run_s=metrics["run_s"],
            elapsed_s=elapsed,
            eta_s=eta,
        )
        if on_run_done is not None:
            on_run_done(run.run_id)

    def interrupted(run_id: str | None) -> None:
        report(
            "sweep",
            f"interrupted{f' during {run_id}' if run_id else ''}: "
            f"{len(result.skipped) + len(result.done)} of {len(runs)} runs finished; run the "
            f"same command again to resume",
            done=len(result.skipped) + len(result.done),
            total=len(runs),
            run_id=run_id,
        )

    if executor is not None:
        try:
            executor.execute(spec, out, pending, bases_dir, device, report, record)
        except (KeyboardInterrupt, SystemExit):
            interrupted(None)
            raise
    else:
        base_cache = Bases(bases_dir, spec, data, device, report)
        for run in pending:
            finished = len(result.skipped) + len(result.done)
            report(
                "sweep",
                f"[{finished + 1}/{len(runs)}] {run.run_id} ...",
                done=finished,
                total=len(runs),
                transient=True,
                run_id=run.run_id,
            )
            try:
                metrics, error = attempt(spec, run, out, base_cache, data, device)
            except (KeyboardInterrupt, SystemExit):
                interrupted(run.run_id)
                raise
            record(run, metrics, error)
    if result.failed:
        report(
            "sweep",
            f"{len(result.failed)} run(s) failed (see runs/<id>/error.txt): "
            + ", ".join(result.failed),
            done=len(result.skipped) + len(result.done),
            total=len(runs),
            failed=list(result.failed),
        )
    return result
