"""MIPP on LeNet-5 / Fashion-MNIST: widths, one-shot and fine-tuned accuracy, cost, speed.

    python benchmarks/lenet_fmnist.py --profile quick   # minutes on a 2-core CPU
    python benchmarks/lenet_fmnist.py --profile full    # 3 seeds, 5,000 calibration samples

For each seed: train LeNet-5 for 3 epochs (the README demo's recipe), then for each
estimator (linear, gaussian) and each sparsity (50 / 70 / 90 % of units removed) prune it
with MIPP in target mode, record per-layer widths, one-shot test accuracy, test accuracy
after one fine-tuning epoch (SGD, lr 0.05 cosine: the training recipe), parameters,
MACs and selection time.

The paper's estimator (``mlp``) is too slow for a bisection, so it runs one selection pass
at the relative threshold the linear estimator chose for 70 %; in the same run the linear
estimator makes the same single pass, and the ratio of the two selection times is reported
(plus the ratio to linear's whole target-mode run, bisection included).

Every pruning is one :func:`mipp.experiments.cell.run_cell` (prune → one-shot accuracy →
fine-tune → accuracy), the same cell the sweeps run.

Writes ``benchmarks/results/lenet_fmnist_<profile>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp.experiments.cell import Cell, run_cell
from mipp.methods import MIPP
from mipp.progress import ProgressEvent
from mipp.zoo import data, models
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import evaluate, seeded, train

PROFILES = {
    "quick": {"seeds": [0], "calib": 2048, "sparsities": [0.5, 0.7, 0.9]},
    "full": {"seeds": [0, 1, 2], "calib": 5000, "sparsities": [0.5, 0.7, 0.9]},
}
ESTIMATORS = ["linear", "gaussian"]
TRAIN = TrainConfig(epochs=3, lr=0.05)
FINETUNE = TrainConfig(epochs=1, lr=0.05)
OUT = Path(__file__).parent / "results"


def _say(event: ProgressEvent) -> None:
    """Print the lasting progress lines of a slow pass (the mlp estimator's)."""
    if not event.transient:
        print(f"    {event.message}", flush=True)


def _row(seed, estimator, mode, sparsity, cell: Cell, base_acc, t_select):
    report = cell.report
    one_shot = cell.one_shot
    tuned = cell.final.top1
    widths = [g.width_after for g in reversed(report.groups)]  # input -> output
    return {
        "seed": seed,
        "estimator": estimator,
        "mode": mode,
        "requested": sparsity,
        "units_removed": round(report.achieved["units"], 4),
        "params_removed": round(report.achieved["params"], 4),
        "macs_removed": round(report.achieved["macs"], 4),
        "widths": "-".join(map(str, widths)),
        "params": report.params_after,
        "macs": report.macs_after,
        "accuracy_unpruned": round(base_acc, 4),
        "accuracy_one_shot": round(one_shot, 4),
        "accuracy_finetuned": round(tuned, 4),
        "selection_s": round(t_select, 3),
        "total_prune_s": round(report.timings["total"], 3),
        "threshold": report.threshold,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-mlp", action="store_true", help="skip the slow mlp pass")
    args = parser.parse_args(argv)
    prof = PROFILES[args.profile]
    train_ds = data.load_dataset("fashion-mnist", split="train")
    test = data.load_dataset("fashion-mnist", split="test")
    rows, speed = [], []
    for seed in prof["seeds"]:
        with seeded(seed):
            base = models.create("lenet5", in_channels=1, input_size=28)
        train(base, train_ds, TrainConfig(**{**TRAIN.to_dict(), "seed": seed}))
        base_acc = evaluate(base, test).top1
        print(f"seed {seed}: LeNet-5 trained, test accuracy {base_acc:.4f}", flush=True)
        tau70 = None
        linear70_total = None
        for estimator in ESTIMATORS:
            for s in prof["sparsities"]:
                cell = run_cell(
                    base,
                    train_ds,
                    test,
                    method=MIPP(estimator=estimator, reconstruct=False),
                    retrain=FINETUNE,
                    sparsity=s,
                    calib_samples=prof["calib"],
                    seed=seed,
                )
                row = _row(
                    seed, estimator, "target", s, cell, base_acc, cell.report.timings["selection"]
                )
                rows.append(row)
                print(
                    f"  {estimator:8s} {s:.0%}: widths {row['widths']}, one-shot "
                    f"{row['accuracy_one_shot']:.4f}, fine-tuned {row['accuracy_finetuned']:.4f}, "
                    f"selection {row['selection_s']:.2f} s",
                    flush=True,
                )
                if estimator == "linear" and s == 0.7:
                    tau70 = cell.report.threshold
                    linear70_total = cell.report.timings["selection"]
        if args.skip_mlp or tau70 is None:
            continue
        # the paper's estimator vs the closed form: one selection pass each, same threshold
        passes = {}
        for estimator in ("linear", "mlp"):
            cell = run_cell(
                base,
                train_ds,
                test,
                method=MIPP(estimator=estimator, threshold=tau70, reconstruct=False),
                retrain=FINETUNE,
                calib_samples=prof["calib"],
                seed=seed,
                progress=_say if estimator == "mlp" else None,
            )
            passes[estimator] = cell.report.timings["selection"] + cell.report.timings["statistics"]
            rows.append(_row(seed, estimator, "threshold", None, cell, base_acc, passes[estimator]))
            print(
                f"  {estimator} single pass at threshold {tau70:.3e}: "
                f"{passes[estimator]:.2f} s, units removed "
                f"{cell.report.achieved['units']:.3f}",
                flush=True,
            )
        speed.append(
            {
                "seed": seed,
                "threshold": tau70,
                "mlp_pass_s": round(passes["mlp"], 3),
                "linear_pass_s": round(passes["linear"], 4),
                "mlp_over_linear_pass": round(passes["mlp"] / passes["linear"], 1),
                "linear_target_mode_s": round(linear70_total, 3),
                "mlp_pass_over_linear_target_mode": round(passes["mlp"] / linear70_total, 1),
            }
        )

    stem = args.out / f"lenet_fmnist_{args.profile}"
    meta = {
        "command": f"python benchmarks/lenet_fmnist.py --profile {args.profile}"
        + (" --skip-mlp" if args.skip_mlp else ""),
        "profile": prof,
        "train": TRAIN.to_dict(),
        "finetune": FINETUNE.to_dict(),
        "speed": speed,
    }
    write_results(stem, rows, meta)
    _plot(rows, speed, f"{stem}.png", args.profile)
    print(f"wrote {stem}.csv, .json, .png")
    return 0


def _plot(rows, speed, path, profile) -> None:
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(11 if speed else 6, 4))
    axes = axes if speed else [axes]
    ax = axes[0]
    for estimator, color in zip(ESTIMATORS, ("C0", "C1"), strict=True):
        pts = [r for r in rows if r["estimator"] == estimator and r["mode"] == "target"]
        xs = sorted({r["requested"] for r in pts})
        for key, style, label in (
            ("accuracy_one_shot", "--", "one-shot"),
            ("accuracy_finetuned", "-", "1 fine-tuning epoch"),
        ):
            ys = [
                sum(r[key] for r in pts if r["requested"] == x)
                / sum(1 for r in pts if r["requested"] == x)
                for x in xs
            ]
            ax.plot(
                [100 * x for x in xs],
                ys,
                style,
                marker="o",
                color=color,
                label=f"{estimator}, {label}",
            )
    base = rows[0]["accuracy_unpruned"]
    ax.axhline(base, color="grey", lw=0.8, label=f"unpruned ({base:.3f})")
    ax.set_xlabel("% of units removed")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MIPP on LeNet-5 / Fashion-MNIST ({profile})")
    ax.legend(fontsize=7)
    if speed:
        ax = axes[1]
        s = speed[0]
        labels = ["linear\n(one pass)", "linear\n(target mode)", "mlp, the paper's\n(one pass)"]
        values = [s["linear_pass_s"], s["linear_target_mode_s"], s["mlp_pass_s"]]
        ax.bar(labels, values, color=["C0", "C0", "C3"])
        ax.set_yscale("log")
        ax.set_ylabel("selection time (s, log scale)")
        ax.set_title(f"mlp / linear, one pass each: {s['mlp_over_linear_pass']:.0f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
