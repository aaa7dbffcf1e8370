"""Experiments: sweeps over model × dataset × regime × method × sparsity × seed, and reports.

- :mod:`~mipp.experiments.spec` reads and checks a TOML config (``experiments/*.toml``);
- :mod:`~mipp.experiments.runner` runs its grid resumably into a sweep directory;
- :mod:`~mipp.experiments.report` aggregates a sweep into CSV, plots and ``REPORT.md``.

Command line: ``mipp sweep CONFIG --profile quick`` then ``mipp report SWEEP_DIR``.
"""

from mipp.experiments.spec import Run, SweepSpec, load_spec, resolve

__all__ = ["Run", "SweepSpec", "load_spec", "resolve"]
