"""Few calibration samples on 4,096-wide layers: VGG-11-BN's classifier, accuracy by sample count.

    python benchmarks/wide_layer_samples.py --threads 2

The network is a user's own: VGG-11-BN's feature extractor at quarter width (16 … 128
filters, as the zoo's standard VGG-11 study uses) under torchvision's classifier, global
pooling → Linear 4,096 → ReLU → Dropout → Linear 4,096 → ReLU → Dropout → Linear 10, so the
two 4,096-unit layers are the widest groups MIPP meets in VGG-11-BN. It is trained once on
Fashion-MNIST at 32 px (5 epochs, SGD lr 0.05 cosine, seed 0) and cached under
``runs/bench/wide-vgg11``. MIPP then removes 70 % of all units (global threshold, target
mode) from 256 … 16,384 seeded training samples — far fewer than the 4,096 features of the
classifier layers at the low end, where only the ridge keeps Δ_i defined — with its default
(``gaussian`` + reconstruction) and the paper's setting (``paper=True``: ``linear``, no
reconstruction). Each row: the classifier widths kept, the share of the kept 4,096-layer
units that the largest calibration set also keeps, one-shot test accuracy and test accuracy
after ``--finetune-epochs`` fine-tuning epochs (default 1, SGD lr 0.01, the same for every
row; 0 skips it), and the pruning time.

Writes ``<out>/wide_layer_samples.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from _results import write_results
from torch import nn

import mipp
from mipp.methods import MIPP
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import load_dataset
from mipp.zoo.models import create
from mipp.zoo.training import evaluate, seeded, train

OUT = Path(__file__).parent / "results"
CACHE = Path("runs/bench/wide-vgg11")
SIZES = (256, 1024, 4096, 16384)
WIDTHS = [16, 32, 64, 64, 128, 128, 128, 128]
WIDE = ("classifier.0", "classifier.3")


class WideVGG(nn.Module):
    """Quarter-width VGG-11-BN features under torchvision's 4,096-wide classifier."""

    def __init__(self) -> None:
        super().__init__()
        vgg = create("vgg11", num_classes=10, in_channels=1, widths=WIDTHS)
        self.features = vgg.features
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(WIDTHS[-1], 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _base(train_ds, test_ds) -> tuple[nn.Module, float]:
    path = CACHE / "trained.pt"
    with seeded(0):
        net = WideVGG()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        print("training the base (5 epochs) ...", flush=True)
        train(net, train_ds, TrainConfig(epochs=5, lr=0.05, schedule="cosine", seed=0))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    net.eval()
    return net, evaluate(net, test_ds).top1


def _kept(report, name: str) -> set[int]:
    group = next(g for g in report.groups if g.name == name)
    return set(group.kept)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = any(r["accuracy_finetuned"] is not None for r in rows)
    panels = [("accuracy_one_shot", "one-shot")]
    if tuned:
        panels.append(("accuracy_finetuned", "after fine-tuning"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for setting, marker in (("default", "o"), ("paper", "s")):
            sel = [r for r in rows if r["setting"] == setting]
            n = [r["calib_samples"] for r in sel]
            ax.plot(n, [r[key] for r in sel], marker=marker, label=setting)
        ax.axhline(rows[0]["accuracy_base"], color="black", lw=1, ls="--", label="unpruned")
        ax.axvline(4096, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples (dotted: 4,096 features per wide layer)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{rows[0]['sparsity']:.0%} of units removed, {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="fine-tuning epochs per row (0: none)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_ds = load_dataset("fashion-mnist", split="train", pad_to_32=True)
    test_ds = load_dataset("fashion-mnist", split="test", pad_to_32=True)
    model, base = _base(train_ds, test_ds)
    rows, reference = [], {}
    for label, method in (("default", MIPP()), ("paper", MIPP(paper=True))):
        results = {}
        for n in sorted(args.sizes, reverse=True):  # the largest first: the reference
            t = time.perf_counter()
            result = mipp.prune(
                model, train_ds, method=method, sparsity=args.sparsity, calib_samples=n, seed=0
            )
            seconds = time.perf_counter() - t
            if not reference.get(label):
                reference[label] = {w: _kept(result.report, w) for w in WIDE}
            agree = []
            for w in WIDE:
                kept = _kept(result.report, w)
                agree.append(len(kept & reference[label][w]) / max(len(kept), 1))
            one_shot = evaluate(result.model, test_ds).top1
            tuned = None
            if args.finetune_epochs:
                net = copy.deepcopy(result.model)
                config = TrainConfig(epochs=args.finetune_epochs, lr=0.01, schedule="step", seed=0)
                train(net, train_ds, config)
                tuned = evaluate(net, test_ds).top1
            results[n] = {
                "setting": label,
                "sparsity": args.sparsity,
                "calib_samples": n,
                "units_removed": round(result.report.achieved["units"], 4),
                "width_classifier_0": len(_kept(result.report, WIDE[0])),
                "width_classifier_3": len(_kept(result.report, WIDE[1])),
                "agreement_classifier_0": round(agree[0], 4),
                "agreement_classifier_3": round(agree[1], 4),
                "accuracy_base": base,
                "accuracy_one_shot": one_shot,
                "accuracy_finetuned": tuned,
                "prune_s": round(seconds, 1),
            }
            print(results[n], flush=True)
        rows += [results[n] for n in sorted(results)]
    meta = {
        "command": "python " + " ".join(sys.argv),
        "model": "quarter-width VGG-11-BN features + torchvision's 4096-4096-10 classifier",
    }
    write_results(args.out / "wide_layer_samples", rows, meta)
    _plot(rows, args.out / "wide_layer_samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
