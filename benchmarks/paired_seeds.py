"""Paired comparisons over seeds from a sweep's ``runs.csv``: mean ± std per method and the
per-seed difference of one method against the others (same base network per seed).

    python benchmarks/paired_seeds.py results/vgg11-fmnist-standard-macs/runs.csv --method mipp

For every (regime, sparsity) cell: each method's final accuracy (mean ± sample std over its
seeds) and, for every other method, the paired difference ``method − other`` in points, per
seed, with the two-sided p of ``scipy.stats.ttest_rel`` over the seeds both have. Prints a
table; writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict

from scipy.stats import ttest_rel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_csv")
    parser.add_argument("--method", default="mipp", help="the label compared with the others")
    parser.add_argument("--metric", default="accuracy_final")
    args = parser.parse_args(argv)
    cells: dict[tuple[str, float], dict[str, dict[int, float]]] = defaultdict(dict)
    with open(args.runs_csv, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["regime"], float(row["sparsity"]))
            cells[key].setdefault(row["method"], {})[int(row["seed"])] = float(row[args.metric])
    for (regime, sparsity), methods in sorted(cells.items()):
        print(f"== {regime}, sparsity {sparsity}")
        for name, seeds in sorted(methods.items()):
            values = [seeds[s] for s in sorted(seeds)]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"{name:<24} n={len(values)}  {statistics.mean(values):.3f} ± {spread:.3f}")
        mine = methods.get(args.method, {})
        for name, seeds in sorted(methods.items()):
            common = sorted(set(mine) & set(seeds))
            if name == args.method or len(common) < 2:
                continue
            a, b = [mine[s] for s in common], [seeds[s] for s in common]
            diff = [100 * (x - y) for x, y in zip(a, b, strict=True)]
            p = ttest_rel(a, b).pvalue
            print(
                f"  {args.method} − {name}: {statistics.mean(diff):+.1f} points, per seed "
                f"{' / '.join(f'{d:+.1f}' for d in diff)}, p = {p:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
