"""Every method on LeNet-5 / Fashion-MNIST at equal sparsity: one-shot, fine-tuned, cost.

    python benchmarks/baselines_lenet_fmnist.py --profile quick   # 14 min, 1 thread, beside a sweep
    python benchmarks/baselines_lenet_fmnist.py --profile full    # 3 seeds, both allocations

For each seed: train LeNet-5 for 3 epochs (the README demo's recipe). For each requested
share of units removed (70 %, 90 %), MIPP (its default estimator, target mode, *without* its
reconstruction: no method here gets a repair; the standard studies show both) prunes first;
every baseline then runs with ``match=`` MIPP's report, so all methods remove the same number
of units. Each pruned network is evaluated as it is (one-shot; a collapsed network included),
then fine-tuned for one epoch with the same recipe (SGD lr 0.05, cosine) and evaluated again.
The quick profile runs each baseline with its default allocation, plus L1 with global
ranking; the full profile runs every baseline with both allocations.

Scoring time is the method's own work (MIPP: capture + statistics + selection with its
bisection; baselines: the scoring rounds, IMP's re-training excluded and reported apart),
measured in the same run, so ratios between methods are meaningful (the report's
``work_seconds``); ``total_prune_s`` is the whole :func:`mipp.prune` call. IMP re-trains
between its 3 rounds (1 epoch each, lr 0.01): two extra epochs no other method gets, listed
in ``extra_training_epochs`` (the method's own count). Network Slimming (``slimming``) scores
BatchNorm scales, which LeNet-5 has none of: it refuses the model and is left out here, as is
``sp-pai``, a pruning-at-initialisation method that re-initialises the network (this benchmark
prunes a trained one).

Every pruning is one :func:`mipp.experiments.cell.run_cell` (prune → one-shot accuracy →
fine-tune → accuracy), the same cell the sweeps run.

Writes ``benchmarks/results/baselines_lenet_fmnist_<profile>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp.experiments.cell import run_cell
from mipp.methods import BASELINE_NAMES, METHODS, MIPP, make_method
from mipp.zoo import data, models
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import evaluate, seeded, train

PROFILES = {
    "quick": {"seeds": [0], "calib": 2048, "sparsities": [0.7, 0.9], "both": False},
    "full": {"seeds": [0, 1, 2], "calib": 2048, "sparsities": [0.7, 0.9], "both": True},
}
TRAIN = TrainConfig(epochs=3, lr=0.05)
FINETUNE = TrainConfig(epochs=1, lr=0.05)
OUT = Path(__file__).parent / "results"
#: methods that score normalisation layers, which LeNet-5 has none of
NEEDS_NORMS = ("slimming",)
#: methods that re-initialise the network: pruning at initialisation only
PAI_ONLY = ("sp-pai",)


def _runs(both: bool) -> list[tuple[str, str | None]]:
    runs: list[tuple[str, str | None]] = [("mipp", None)]
    for name in BASELINE_NAMES:
        if name in NEEDS_NORMS + PAI_ONLY:  # refused / not PaT (see the docstring)
            continue
        allocations = ("global", "uniform") if both else (METHODS[name].default_allocation,)
        if not both and name == "l1":
            allocations = ("uniform", "global")
        runs += [(name, a) for a in allocations]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the PNG from the profile's JSON"
    )
    args = parser.parse_args(argv)
    prof = PROFILES[args.profile]
    stem = args.out / f"baselines_lenet_fmnist_{args.profile}"
    if args.plot_only:
        _plot(json.loads(Path(f"{stem}.json").read_text())["rows"], f"{stem}.png", args.profile)
        return 0
    train_ds = data.load_dataset("fashion-mnist", split="train")
    test = data.load_dataset("fashion-mnist", split="test")
    rows = []
    runs = _runs(prof["both"])
    for seed in prof["seeds"]:
        with seeded(seed):
            base = models.create("lenet5", in_channels=1, input_size=28)
        train(base, train_ds, TrainConfig(**{**TRAIN.to_dict(), "seed": seed}))
        base_acc = evaluate(base, test).top1
        print(f"seed {seed}: LeNet-5 trained, test accuracy {base_acc:.4f}", flush=True)
        for s in prof["sparsities"]:
            reference = None
            for name, allocation in runs:
                tune = TrainConfig(**{**FINETUNE.to_dict(), "seed": seed})
                cell = run_cell(
                    base,
                    train_ds,
                    test,
                    method=MIPP(reconstruct=False)
                    if name == "mipp"
                    else make_method(name, allocation=allocation),
                    retrain=tune,
                    sparsity=s if name == "mipp" else None,
                    match=None if name == "mipp" else reference,
                    calib_samples=prof["calib"],
                    seed=seed,
                )
                report = cell.report
                if name == "mipp":
                    reference = report
                one_shot, tuned = cell.one_shot, cell.final.top1
                row = {
                    "seed": seed,
                    "requested": s,
                    "method": name,
                    "allocation": allocation or "mipp",
                    "units_removed": round(report.achieved["units"], 4),
                    "params_removed": round(report.achieved["params"], 4),
                    "macs_removed": round(report.achieved["macs"], 4),
                    "widths": "-".join(str(g.width_after) for g in reversed(report.groups)),
                    "collapsed": " ".join(report.collapsed),
                    "params": report.params_after,
                    "macs": report.macs_after,
                    "accuracy_unpruned": round(base_acc, 4),
                    "accuracy_one_shot": round(one_shot, 4),
                    "accuracy_finetuned": round(tuned, 4),
                    "scoring_s": round(report.work_seconds, 4),
                    "retraining_s": round(report.timings.get("between_rounds", 0.0), 3),
                    "total_prune_s": round(report.timings["total"], 3),
                    "extra_training_epochs": cell.extra_training_epochs,
                }
                rows.append(row)
                print(
                    f"  {s:.0%} {name:16s} {row['allocation']:8s} widths {row['widths']:>12s} "
                    f"one-shot {one_shot:.4f} fine-tuned {tuned:.4f} "
                    f"scoring {row['scoring_s']:.3f} s"
                    + (f" COLLAPSED {row['collapsed']}" if row["collapsed"] else ""),
                    flush=True,
                )

    meta = {
        "command": f"python benchmarks/baselines_lenet_fmnist.py --profile {args.profile}",
        "profile": prof,
        "train": TRAIN.to_dict(),
        "finetune": FINETUNE.to_dict(),
    }
    write_results(stem, rows, meta)
    _plot(rows, f"{stem}.png", args.profile)
    print(f"wrote {stem}.csv, .json, .png")
    return 0


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def _plot(rows, path, profile) -> None:
    labels = []
    for r in rows:
        label = r["method"] if r["allocation"] == "mipp" else f"{r['method']} ({r['allocation']})"
        if label not in labels:
            labels.append(label)

    def pick(label, s):
        return [
            r
            for r in rows
            if r["requested"] == s
            and (r["method"] if r["allocation"] == "mipp" else f"{r['method']} ({r['allocation']})")
            == label
        ]

    sparsities = sorted({r["requested"] for r in rows})
    fig, axes = plt.subplots(1, len(sparsities) + 1, figsize=(6 * len(sparsities) + 5, 6))
    ys = range(len(labels))
    for ax, s in zip(axes, sparsities, strict=False):
        one = [_mean(pick(lab, s), "accuracy_one_shot") for lab in labels]
        tuned = [_mean(pick(lab, s), "accuracy_finetuned") for lab in labels]
        ax.barh([y + 0.2 for y in ys], tuned, height=0.4, color="C0", label="1 fine-tuning epoch")
        ax.barh([y - 0.2 for y in ys], one, height=0.4, color="C1", label="one-shot")
        for y, lab in zip(ys, labels, strict=True):
            if any(r["collapsed"] for r in pick(lab, s)):
                ax.text(0.12, y, "layer collapse", va="center", fontsize=7, color="C3")
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.axvline(rows[0]["accuracy_unpruned"], color="grey", lw=0.8)
        ax.set_xlabel("test accuracy")
        ax.set_title(f"{s:.0%} of units removed (equal for all)")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    cost = [
        _mean(pick(lab, sparsities[0]), "scoring_s")
        + _mean(pick(lab, sparsities[0]), "retraining_s")
        for lab in labels
    ]
    ax.barh(list(ys), cost, color="C2")
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time to find the mask at {sparsities[0]:.0%} (s, log; IMP: with re-training)")
    ax.set_title("cost of finding the mask")
    fig.suptitle(f"LeNet-5 / Fashion-MNIST, every method ({profile} profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
