"""What ``MIPP(stream_features=k)`` changes on a trained residual network, one-shot.

    python benchmarks/stream_features.py   # ~18 min on one thread with the base cached

ResNet-20 trained on Fashion-MNIST (32×32) by the ``standard`` profile of
``experiments/resnet20_fmnist.toml`` (15 epochs; the seed-0 base is taken from the sweeps'
base cache ``runs/sweeps/bases`` and trained there first if missing, about 2 h on a CPU),
pruned with ``scope="all"`` by MIPP's defaults (``gaussian``, with its reconstruction) and
``stream_features`` = all / 1 / 2, at 50 and 70 % of MACs and 70 and 90 % of units removed,
on 2,048 calibration images drawn with seeds 0 and 1. Recorded per prune: test accuracy
right after pruning (no re-training), the achieved sparsity, the residual streams' widths
and the selection time. One base network: the calibration seeds show how much the choice of
calibration images moves the result, not how much the base does. One-shot accuracy is a
proxy; what counts is the accuracy after fine-tuning, which a sweep measures.

Writes ``benchmarks/results/stream_features.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import torch
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp import prune
from mipp.experiments.bases import Bases, SweepData
from mipp.experiments.spec import load_spec
from mipp.methods import MIPP
from mipp.progress import Reporter
from mipp.zoo.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "results" / "stream_features"
BUDGETS = [("macs", 0.5), ("macs", 0.7), ("units", 0.7), ("units", 0.9)]
KS: list[int | None] = [None, 1, 2]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default=str(ROOT / "runs" / "sweeps" / "bases"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="calibration seeds (default 0 1)")  # fmt: skip
    parser.add_argument("--calib", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(ROOT / "experiments" / "resnet20_fmnist.toml", profile="standard")
    data = SweepData(spec.config["data"], spec.config["folders"])
    bases = Bases(Path(args.bases), spec, data, torch.device("cpu"), Reporter(None, __name__))
    train_ds, test_ds = data("fashion-mnist")
    net, base_acc = bases.get("resnet20", "fashion-mnist", 0, "trained")
    net.eval()
    log(f"base accuracy {base_acc:.4f}")
    rows = []
    for target, sparsity in BUDGETS:
        for k in KS:
            for seed in args.seeds:
                t = time.perf_counter()
                how = MIPP(stream_features=k)
                res = prune(net, train_ds, method=how, sparsity=sparsity, target=target,
                            scope="all", calib_samples=args.calib, seed=seed)  # fmt: skip
                elapsed = time.perf_counter() - t
                acc = evaluate(res.model, test_ds).top1
                groups = reversed(res.report.groups)
                rows.append({
                    "target": target,
                    "sparsity": sparsity,
                    "stream_features": "all" if k is None else k,
                    "calib_seed": seed,
                    "accuracy_one_shot": round(acc, 4),
                    "achieved": round(res.report.achieved[target], 4),
                    "units_removed": round(res.report.achieved["units"], 4),
                    "stream_widths": "-".join(str(g.width_after) for g in groups
                                              if g.kind == "stream"),
                    "selection_s": round(res.report.timings["selection"], 2),
                    "prune_s": round(elapsed, 1),
                })  # fmt: skip
                log(f"{target} {sparsity:.0%} k={k} seed {seed}: one-shot {acc:.4f} "
                    f"streams {rows[-1]['stream_widths']}")  # fmt: skip
    command = "python benchmarks/stream_features.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_results(OUT, rows, {"command": command, "base_accuracy": base_acc})
    plot(rows, Path(f"{OUT}.png"), base_acc)
    return 0


def plot(rows: list[dict], path: Path, base_acc: float) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{t} {s:.0%}" for t, s in BUDGETS]
    width = 0.25
    for j, k in enumerate(KS):
        key = "all" if k is None else k
        means, errs = [], []
        for t, s in BUDGETS:
            accs = [r["accuracy_one_shot"] for r in rows if (r["target"], r["sparsity"],
                    r["stream_features"]) == (t, s, key)]  # fmt: skip
            means.append(statistics.mean(accs))
            errs.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        ax.bar([i + (j - 1) * width for i in range(len(BUDGETS))], means, width, yerr=errs,
               capsize=3, label=f"stream_features={key}")  # fmt: skip
    ax.axhline(base_acc, color="k", ls=":", lw=1, label=f"unpruned {base_acc:.3f}")
    ax.set_xticks(range(len(BUDGETS)), labels)
    ax.set_ylabel("one-shot test accuracy (MIPP's repair, no re-training)")
    ax.set_title("ResNet-20 / Fashion-MNIST, scope all: stream features per unit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
