"""Experiments: sweeps over model × dataset × regime × method × sparsity × seed, and reports.

- :mod:`~mipp.experiments.spec` reads and checks a TOML config (``experiments/*.toml``);
- :mod:`~mipp.experiments.cell` is one cell of a study: prune → one-shot accuracy →
  re-train → final accuracy;
- :mod:`~mipp.experiments.runner` runs a grid of cells resumably into a sweep directory,
  from the data and base networks of :mod:`~mipp.experiments.bases`;
- :mod:`~mipp.experiments.report` aggregates a sweep into CSV, plots and ``REPORT.md``
  (:mod:`~mipp.experiments.results` the data and statistics,
  :mod:`~mipp.experiments.figures` the plots, :mod:`~mipp.experiments.markdown` the text).

Command line: ``mipp sweep CONFIG --profile quick`` then ``mipp report SWEEP_DIR``.
"""

from mipp.experiments.spec import Run, SweepSpec, load_spec, resolve

__all__ = ["Run", "SweepSpec", "load_spec", "resolve"]
