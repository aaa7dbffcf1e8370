"""Is MIPP's default at least level with the best baseline? The target of the standard studies.

    python benchmarks/target_check.py            # the committed standard studies
    python benchmarks/target_check.py results/vgg11-fmnist-standard/runs.csv ...

For every study (a sweep's ``runs.csv``) and requested sparsity: MIPP's default (the sweep's
reference run, whose achieved sparsity every other method is given), the best MIPP variant,
and the best baseline, each baseline method at the better of its variants (with and without
the repair, and any other variant the study ran: "each baseline at its better of with /
without the repair"), all as final accuracy mean ± sample std over seeds. Then the paired
difference default − best baseline over the seeds both have (the same base network per
seed), per seed, with the two-sided p of ``scipy.stats.ttest_rel``, and whether the target
(default mean ≥ best baseline mean) is met. A cell with fewer than three seeds on either
side says so: it is not a conclusion.

Prints a Markdown table and writes ``benchmarks/results/target_check.{csv,json}`` (one row
per study and sparsity; ``--no-write`` only prints).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from _results import write_results
from scipy.stats import ttest_rel

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "target_check"
#: the standard studies the issue's target is about (units: 70 / 90 %, MACs: 50 / 70 %)
STUDIES = (
    "lenet5-fmnist-standard",
    "lenet5-fmnist-standard-baselines",  # the 16 other baselines, LeNet-5 at 70 / 90 %
    "vgg11-fmnist-standard",
    "resnet20-fmnist-standard",
    "lenet5-fmnist-macs-standard",
    "vgg11-fmnist-standard-macs",
    "resnet20-fmnist-standard-macs",
)
FULL = 3  # seeds a cell needs before it counts as a conclusion


def _reference(runs_csv: Path, rows: list[dict[str, str]]) -> str:
    """The label of MIPP's default in this study: the sweep's reference run."""
    meta = runs_csv.parent / "sweep" / "sweep.json"
    if meta.is_file():
        ref = json.loads(meta.read_text()).get("config", {}).get("prune", {}).get("reference")
        if ref:
            return str(ref)
    refs = {r.get("reference") for r in rows if r.get("reference")}
    if len(refs) == 1:
        return refs.pop()
    raise SystemExit(f"{runs_csv}: cannot tell MIPP's default (reference run) from {refs}")


def _mean_std(seeds: dict[int, float]) -> tuple[float, float]:
    values = [seeds[s] for s in sorted(seeds)]
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.mean(values), spread


def check(runs_csv: Path) -> list[dict]:
    with runs_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    default = _reference(runs_csv, rows)
    # (regime, sparsity) → label → seed → accuracy; label → family (method_name)
    cells: dict[tuple[str, float], dict[str, dict[int, float]]] = defaultdict(dict)
    family: dict[str, str] = {}
    for r in rows:
        key = (r["regime"], float(r["sparsity"]))
        cells[key].setdefault(r["method"], {})[int(r["seed"])] = float(r["accuracy_final"])
        family[r["method"]] = r["method_name"]
    out = []
    for (regime, sparsity), labels in sorted(cells.items()):
        if default not in labels:
            continue
        mine = labels[default]
        m_mean, m_std = _mean_std(mine)
        mipps = {k: v for k, v in labels.items() if family[k] == "mipp"}
        best_mipp = max(mipps, key=lambda k: _mean_std(mipps[k])[0])
        # each baseline method at the better of its variants (by mean)
        best_of: dict[str, str] = {}
        for label, seeds in labels.items():
            fam = family[label]
            if fam == "mipp":
                continue
            if fam not in best_of or _mean_std(seeds)[0] > _mean_std(labels[best_of[fam]])[0]:
                best_of[fam] = label
        if not best_of:
            continue
        rival = max(best_of.values(), key=lambda k: _mean_std(labels[k])[0])
        r_mean, r_std = _mean_std(labels[rival])
        common = sorted(set(mine) & set(labels[rival]))
        diff = [100 * (mine[s] - labels[rival][s]) for s in common]
        p = (
            float(ttest_rel([mine[s] for s in common], [labels[rival][s] for s in common]).pvalue)
            if len(common) > 1
            else float("nan")
        )
        seeds = min(len(mine), len(labels[rival]))
        out.append({
            "study": runs_csv.parent.name,
            "regime": regime,
            "sparsity": sparsity,
            "default": default,
            "default_mean": round(m_mean, 4),
            "default_std": round(m_std, 4),
            "default_seeds": len(mine),
            "best_mipp": best_mipp,
            "best_mipp_mean": round(_mean_std(mipps[best_mipp])[0], 4),
            "best_baseline": rival,
            "baseline_mean": round(r_mean, 4),
            "baseline_std": round(r_std, 4),
            "baseline_seeds": len(labels[rival]),
            "difference_points": round(100 * (m_mean - r_mean), 2),
            "paired_points": " / ".join(f"{d:+.1f}" for d in diff),
            "p": round(p, 3),
            "met": m_mean >= r_mean,
            "conclusive": seeds >= FULL,
        })  # fmt: skip
    return out


def _cell(mean: float, std: float, n: int) -> str:
    spread = "" if std != std else f" ± {std:.3f}"  # NaN for one seed
    return f"{mean:.3f}{spread}" + ("" if n >= FULL else f" (n = {n})")


def _p(p: float) -> str:
    return "–" if p != p else f"{p:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="runs.csv files (default: STUDIES)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    paths = args.runs or [ROOT / "results" / s / "runs.csv" for s in STUDIES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no runs.csv at {', '.join(missing)}")
    rows = [row for p in paths for row in check(p)]
    print(
        "| study | sparsity | MIPP default | best baseline (its better variant) "
        "| default − baseline, per seed | p | target |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = ("met" if r["met"] else "not met") + (
            "" if r["conclusive"] else ", too few seeds"
        )
        print(
            f"| {r['study']} | {100 * r['sparsity']:.0f} % | "
            f"{_cell(r['default_mean'], r['default_std'], r['default_seeds'])} | "
            f"{r['best_baseline']} "
            f"{_cell(r['baseline_mean'], r['baseline_std'], r['baseline_seeds'])} | "
            f"{r['difference_points']:+.1f} ({r['paired_points']}) | {_p(r['p'])} | {verdict} |"
        )  # fmt: skip
    if not args.no_write and rows:
        command = " ".join(
            ["python benchmarks/target_check.py", *(sys.argv[1:] if argv is None else argv)]
        )
        write_results(OUT, rows, {"command": command, "studies": [str(p) for p in paths]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
