"""Fewer calibration samples than a layer has features: what target mode costs in accuracy.

    python benchmarks/calibration_floor.py CHECKPOINT      # a trained LeNet-5, e.g. the cached
    # standard base runs/sweeps/bases/lenet5-fashion-mnist-seed0-7345685740/trained.safetensors

LeNet-5's fc1 has 120 units (features) and fc2 84. In threshold and target modes MIPP needs
only Δ_i, which the ridge keeps defined with any number of samples, so calibration sets
smaller than a layer are allowed there (confidence mode still needs features + 2). For 32 …
2,048 seeded training samples and 70 / 90 % of units removed, MIPP's default (gaussian with
its reconstruction) and the paper's setting (``paper=True``: linear, no reconstruction) record
the per-layer widths, one-shot test accuracy, and test accuracy after one fine-tuning epoch
(SGD lr 0.01, the same for every row).

Writes ``<out>/calibration_floor.{csv,json}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _results import write_results

import mipp
from mipp.methods import MIPP
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import load_dataset
from mipp.zoo.training import evaluate, train

OUT = Path(__file__).parent / "results"
SIZES = (32, 64, 128, 512, 2048)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trained LeNet-5 (.safetensors)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = mipp.load_checkpoint(args.checkpoint).model.eval()
    train_ds = load_dataset("fashion-mnist", split="train")
    test_ds = load_dataset("fashion-mnist", split="test")
    base = evaluate(model, test_ds).top1
    rows = []
    for sparsity in (0.7, 0.9):
        for label, method in (("default", MIPP()), ("paper", MIPP(paper=True))):
            for n in args.sizes:
                result = mipp.prune(
                    model, train_ds, method=method, sparsity=sparsity, calib_samples=n, seed=0
                )
                one_shot = evaluate(result.model, test_ds).top1
                net = copy.deepcopy(result.model)
                train(net, train_ds, TrainConfig(epochs=1, lr=0.01, schedule="step", seed=0))
                row = {
                    "setting": label,
                    "sparsity": sparsity,
                    "calib_samples": n,
                    "units_removed": result.report.achieved["units"],
                    "widths": "-".join(str(g.width_after) for g in reversed(result.report.groups)),
                    "accuracy_base": base,
                    "accuracy_one_shot": one_shot,
                    "accuracy_finetuned_1ep": evaluate(net, test_ds).top1,
                }
                print(row, flush=True)
                rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "checkpoint": args.checkpoint}
    write_results(args.out / "calibration_floor", rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
