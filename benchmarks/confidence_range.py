"""The paper's confidence rule on a trained LeNet-5: how much each confidence level prunes.

    python benchmarks/confidence_range.py CHECKPOINT          # e.g. a cached standard base:
    python benchmarks/confidence_range.py \\
        runs/sweeps/bases/lenet5-fashion-mnist-seed0-7345685740/trained.safetensors
    python benchmarks/confidence_range.py --plot-only         # redraw the PNG from the JSON

The checkpoint is a LeNet-5 trained on Fashion-MNIST (the standard profile's seed-0 base:
``mipp sweep experiments/lenet5_fmnist.toml --profile standard`` trains and caches it). For
the ``linear`` and ``gaussian`` estimators, with the held-out K-fold test (K = 5, the default
in confidence mode) and with the old in-sample test (``folds=0``), and for every confidence
level x in 0.5 … 0.99, ``mipp.prune(model, train, method=MIPP(estimator=..., confidence=x))``
on 2,048 and on 512 seeded training samples (``--calib-samples``; the held-out test only
for the smaller set: fewer samples, less power, more pruning) records the achieved sparsity
of units, params and MACs,
the per-layer widths and the test accuracy one-shot without any repair
(``reconstruct=False``) and with MIPP's reconstruction.

Writes ``<out>/confidence_range.{csv,json}`` and ``<out>/confidence_range.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import mipp
from mipp.estimators import GaussianEstimator, LinearEstimator
from mipp.methods import MIPP
from mipp.zoo.data import load_dataset
from mipp.zoo.training import evaluate

OUT = Path(__file__).parent / "results"
STEM = "confidence_range"
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
ESTIMATORS = {"linear": LinearEstimator, "gaussian": GaussianEstimator}


def run(args: argparse.Namespace) -> list[dict]:
    model = mipp.load_checkpoint(args.checkpoint).model.eval()
    train = load_dataset("fashion-mnist", split="train")
    test = load_dataset("fashion-mnist", split="test")
    rows = []
    base = evaluate(model, test).top1
    print(f"unpruned test accuracy {base:.4f}", flush=True)
    settings = [
        (size, e, c, f)
        for size in args.calib_samples
        for e, c in ESTIMATORS.items()
        for f in ((5, 0) if size == max(args.calib_samples) else (5,))
    ]
    for n, est_name, cls, folds in settings:
        for level in LEVELS:
            row = {"estimator": est_name, "folds": folds, "confidence": level}
            row["calib_samples"] = n
            for reconstruct in (False, True):
                t = time.perf_counter()
                result = mipp.prune(
                    model,
                    train,
                    method=MIPP(
                        estimator=cls(folds=folds),
                        confidence=level,
                        reconstruct=reconstruct,
                    ),
                    calib_samples=n,
                    seed=0,
                )
                key = "reconstructed" if reconstruct else "bare"
                row[f"accuracy_one_shot_{key}"] = evaluate(result.model, test).top1
                row[f"prune_s_{key}"] = time.perf_counter() - t
            rep = result.report
            row |= {f"{k}_removed": v for k, v in rep.achieved.items()}
            row["widths"] = "-".join(str(g.width_after) for g in reversed(rep.groups))
            row["accuracy_base"] = base
            print(
                f"n={n} {est_name:8s} folds {folds} x={level:.2f}: "
                f"units {row['units_removed']:.3f} "
                f"widths {row['widths']:>14s}  one-shot {row['accuracy_one_shot_bare']:.4f}"
                f" / reconstructed {row['accuracy_one_shot_reconstructed']:.4f}",
                flush=True,
            )
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["calib_samples"], r["estimator"], r["folds"]) for r in rows}, reverse=True)
    styles = ["-o", "--o", "-s", "--s", ":^", ":v"]
    for (n, est, folds), style in zip(keys, styles, strict=False):
        part = [
            r for r in rows if (r["calib_samples"], r["estimator"], r["folds"]) == (n, est, folds)
        ]
        test = f"held-out, 5 folds, n={n}" if folds else f"in-sample, n={n}"
        xs = [r["confidence"] for r in part]
        axes[0].plot(xs, [r["units_removed"] for r in part], style, label=f"{est}, {test}")
        axes[1].plot(
            xs, [r["accuracy_one_shot_reconstructed"] for r in part], style, label=f"{est}, {test}"
        )
    axes[0].set(xlabel="confidence x", ylabel="share of units removed", ylim=(0, 1))
    axes[1].set(xlabel="confidence x", ylabel="one-shot test accuracy (reconstructed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MIPP confidence mode on a trained LeNet-5 (Fashion-MNIST)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a trained LeNet-5 (.safetensors)")
    parser.add_argument("--calib-samples", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    args = parser.parse_args()
    stem = args.out / STEM
    if args.plot_only:
        plot(json.loads(stem.with_suffix(".json").read_text())["rows"], stem.with_suffix(".png"))
        return 0
    if not args.checkpoint:
        parser.error("give a trained LeNet-5 checkpoint (or --plot-only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "checkpoint": args.checkpoint,
        "calib_samples": args.calib_samples,
    }
    write_results(stem, rows, meta)
    plot(rows, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
