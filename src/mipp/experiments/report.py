"""Aggregate a finished pruning sweep into a results folder: tables, figures and REPORT.md.

:func:`write_report` reads a sweep directory (:func:`~mipp.experiments.results.load_sweep`)
and writes, into ``results/<sweep name>/`` unless told otherwise:

- ``runs.csv``: one row per finished run, every scalar metric plus ``collapsed`` (names
  joined by spaces) and ``widths`` (kept units per layer, input -> output, as ``6-5-...``);
- ``summary.csv``: :func:`~mipp.experiments.results.summarise` per (model, dataset, regime,
  method, sparsity);
- ``accuracy_<model>_<dataset>.png``: accuracy vs % units removed, one panel per stage
  (PaT one-shot, PaT fine-tuned, PaI one-shot at init, PaI trained from scratch);
- ``efficiency_<model>_<dataset>.png``: final accuracy vs remaining MACs and parameters;
- ``collapse.png``: share of runs with a fully removed layer vs % units removed;
- ``layer_profiles_<model>_<dataset>_<regime>.png``: kept ratio per layer (the paper's
  pruning-ratio figure), one panel per requested sparsity;
- ``cost.png``: mean selection time (``prune_s``, seconds) per method;
- ``REPORT.md``: how the sweep was made, its protocol, the tables, where MIPP wins or
  loses against the best baseline, and the figures.

The data and statistics are :mod:`~mipp.experiments.results`, the figures
:mod:`~mipp.experiments.figures`, the text :mod:`~mipp.experiments.markdown`. Points are
means over seeds; error bars and ``±`` are the sample standard deviation (ddof = 1), absent
when a point has one seed. Accuracies are top-1 fractions in [0, 1]; sparsities are shares
of units (neurons / filters) removed.

    mipp report runs/lenet5-fmnist-quick          # the command, or from Python:
    write_report("runs/lenet5-fmnist-quick", "results/lenet5-fmnist-quick")

:func:`copy_records` (``mipp report --records``) also copies the sweep's records into
``<results folder>/sweep/``: ``sweep.json``, every finished run's ``config.json`` and
``metrics.json``, and the reference runs' ``report.json`` — what ``mipp report`` needs to
summarise the sweep again and what ``mipp sweep`` needs to skip the finished runs of a study
still in progress (copy the folder back to resume it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mipp._io import _exchange, read_json
from mipp.errors import MippError
from mipp.experiments.figures import write_figures
from mipp.experiments.markdown import render_markdown
from mipp.experiments.results import (
    VALUES,
    grid_methods,
    load_sweep,
    order_methods,
    safe_name,
    summarise,
    sweep_reference,
    write_runs_csv,
    write_summary_csv,
)

__all__ = ["copy_records", "write_report"]

#: the values the figures average: the summary's plus the kept shares of MACs and parameters
_FIG_VALUES = (*VALUES, "macs_kept", "params_kept")


def write_report(
    sweep_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write the results folder of a finished sweep and return its path.

    ``out_dir`` defaults to ``results/<sweep name>`` (relative to the working directory).
    See the module docstring for the files written. Raises :class:`~mipp.errors.MippError`
    as :func:`~mipp.experiments.results.load_sweep` does.
    """
    meta, rows = load_sweep(sweep_dir)
    name = str(meta.get("name") or Path(sweep_dir).resolve().name)
    out = Path(out_dir) if out_dir is not None else Path("results") / safe_name(name)
    out.mkdir(parents=True, exist_ok=True)
    methods = order_methods((r["method"] for r in rows), grid_methods(meta))
    write_runs_csv(out / "runs.csv", rows)
    write_summary_csv(out / "summary.csv", rows, methods)
    summary = summarise(rows, values=_FIG_VALUES, methods=methods)
    target = meta.get("config", {}).get("prune", {}).get("target", "units")
    figures = write_figures(out, rows, summary, methods, sweep_reference(meta), target)
    text = render_markdown(meta, rows, methods, figures, sweep_dir)
    (out / "REPORT.md").write_text(text, encoding="utf-8")
    return out


#: the files of a finished run that :func:`copy_records` keeps (the reference run's
#: ``report.json`` too: the other methods of a seed not yet finished match its sparsity)
RECORD_FILES = ("config.json", "metrics.json")


def copy_records(sweep_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Copy the records of the sweep in ``sweep_dir`` into the folder ``dest`` (replacing
    what was there, at once: the new folder is built beside it and swapped in); the number
    of finished runs copied. ``sweep_dir`` and ``dest`` may be the same folder (nothing to do).

    Raises :class:`~mipp.errors.MippError` when ``sweep_dir`` holds no ``sweep.json``.
    """
    src, dest = Path(sweep_dir), Path(dest)
    if read_json(src / "sweep.json") is None:
        raise MippError(f"{src} is not a sweep directory (no readable sweep.json)")
    if dest.resolve() == src.resolve():
        return sum(1 for _ in src.glob("runs/*/metrics.json"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "runs").mkdir(parents=True)
    shutil.copy2(src / "sweep.json", staging / "sweep.json")
    count = 0
    for metrics in sorted(src.glob("runs/*/metrics.json")):
        run = metrics.parent
        config = read_json(run / "config.json")
        if read_json(metrics) is None or config is None:
            continue  # (a run being written: metrics.json is written last, atomically)
        files = list(RECORD_FILES)
        reference = (config.get("prune") or {}).get("reference")
        if config.get("method") == reference and (run / "report.json").is_file():
            files.append("report.json")
        (staging / "runs" / run.name).mkdir()
        for name in files:
            shutil.copy2(run / name, staging / "runs" / run.name / name)
        count += 1
    if dest.exists() and _exchange(staging, dest):  # staging now holds the old records
        shutil.rmtree(staging)
    else:
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    return count
