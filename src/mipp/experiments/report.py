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
"""

from __future__ import annotations

import os
from pathlib import Path

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

__all__ = ["write_report"]

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
