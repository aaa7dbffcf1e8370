"""What MIPP costs, and what one-shot repairs buy: the cost benchmark of issue 5.

    python benchmarks/selection_cost.py --profile quick   # ~10 min on a 2-core CPU
    python benchmarks/selection_cost.py --profile full    # hours on a CPU; a GPU helps
    python benchmarks/selection_cost.py --parts ratio     # one part only (scaling, ratio,
                                                          # lenet, oneshot); --plot-only

Four parts, each written to ``benchmarks/results/selection_cost_<profile>_<part>.{csv,json}``,
plus ``selection_cost_<profile>.json`` (every part, its command and duration) and one PNG
with every panel:

- ``scaling``: wall time of one MIPP selection on one synthetic layer (prepare the
  statistics from the activations, then TERC at a fixed relative threshold) against the
  layer's width at fixed calibration size N, and against N at fixed width, per estimator.
  The layer: U units x = ReLU(z A + noise) from 32 latent factors, target = U next units
  ReLU(x W + noise).
- ``ratio``: MIPP's whole ``prune()`` (50 % of units, target mode, no reconstruction:
  structure, one streamed forward pass with statistics, bisection, removal, verification,
  report) against one plain forward pass of the same N Fashion-MNIST images (4,096; 1,024
  for ResNet-50 and GoogLeNet; 32×32, batch 256, eval, no grad) through the same model,
  timed side by side in this run (the floor is the faster of a forward before and one after
  all of that model's prunes).
  :data:`RATIO_RUNS`: VGG-16, ResNet-56, ResNet-50 (bottlenecks; scope ``internal`` and
  ``all``, the latter also with ``stream_features=1``) and GoogLeNet (four-branch
  Inception modules), each with ``linear`` and ``gaussian``, freshly initialised (selection
  cost does not depend on training much; the bisection's pass count does a little).
  Selection time does not grow with N, the forward pass does: at smaller N the ratio is
  larger (``selection_s`` is recorded on its own).
- ``lenet``: LeNet-5 trained on Fashion-MNIST (3 epochs, the README recipe), pruned to the
  same share of units in target mode by ``linear`` and by ``mlp`` (the paper's estimator):
  time ratio, Jaccard overlap of the kept units per layer, and test accuracy after the same
  one-epoch fine-tuning.
- ``oneshot``: test accuracy without any re-training, after MIPP (and L1, uniform, for
  context) at 70 % and 90 % of units removed, with no repair, ``compensate=True``,
  ``recalibrate_bn=True`` and both; on LeNet-5 and VGG-11 (quick: VGG-11 at a quarter of the
  widths, 2 epochs; full: standard widths, 10 epochs) trained on Fashion-MNIST (32×32).

Every time is measured with ``torch.set_num_threads(--threads)`` (default: all cores) and
nothing else running; ratios are of times taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker
import torch
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp import prune
from mipp.estimators import make_estimator
from mipp.methods import MIPP
from mipp.methods.selection import terc
from mipp.progress import ProgressEvent
from mipp.surgery.capture import stream_activations
from mipp.zoo import data, models
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import evaluate, seeded, train

OUT = Path(__file__).parent / "results"
PARTS = ("scaling", "ratio", "lenet", "oneshot")
#: the ``ratio`` part's prunes per model: (model, scope, estimator), every one without the
#: reconstruction (its cost is compensation_cost.py's subject), each timed against the same
#: model's forward pass
#: with N calibration images (None: the profile's ``ratio_n``; ResNet-50 and GoogLeNet cost
#: ~1.5 GFLOPs per 32-px image, so they run at 1,024 — a conservative choice, since the
#: selection's cost does not shrink with N while the forward pass does)
#: The fifth field is MIPP's ``stream_features`` (None: every feature of a stream unit).
RATIO_RUNS: list[tuple[str, str, str, int | None, int | None]] = [
    ("vgg16", "internal", "linear", None, None),
    ("vgg16", "internal", "gaussian", None, None),
    ("resnet56", "internal", "linear", None, None),
    ("resnet56", "internal", "gaussian", None, None),
    ("resnet50", "internal", "linear", 1024, None),
    ("resnet50", "internal", "gaussian", 1024, None),
    ("resnet50", "all", "gaussian", 1024, None),
    ("resnet50", "all", "gaussian", 1024, 1),
    ("googlenet", "internal", "linear", 1024, None),
    ("googlenet", "internal", "gaussian", 1024, None),
]
PROFILES = {
    "quick": {
        "scaling": {
            "linear": {"widths": [32, 64, 128, 256, 512], "ns": [512, 1024, 2048, 4096, 8192]},
            "gaussian": {"widths": [32, 64, 128, 256, 512], "ns": [512, 1024, 2048, 4096, 8192]},
            "ksg": {"widths": [8, 16, 32, 64, 128, 256], "ns": [256, 512, 1024, 2048, 4096]},
            "mlp": {"widths": [4, 8, 16, 32, 64], "ns": [256, 512, 1024, 2048]},
        },
        "width_n": 2048,
        "n_width": {"linear": 128, "gaussian": 128, "ksg": 16, "mlp": 8},
        "ksg_width_n": 1024,
        "mlp_width_n": 1024,
        "ratio_runs": RATIO_RUNS,
        "ratio_n": 4096,
        "lenet_calib": 1024,
        "lenet_sparsities": [0.7],
        "seeds": [0],
        "oneshot_calib": 2048,
        "vgg_widths": (16, 32, 64, 64, 128, 128, 128, 128),
        "vgg_epochs": 2,
    },
    "full": {
        "scaling": {
            "linear": {
                "widths": [32, 64, 128, 256, 512, 1024, 2048],
                "ns": [512, 2048, 8192, 32768],
            },
            "gaussian": {"widths": [32, 64, 128, 256, 512, 1024], "ns": [512, 2048, 8192, 32768]},
            "ksg": {"widths": [8, 16, 32, 64, 128, 256, 512], "ns": [256, 1024, 4096, 8192]},
            "mlp": {"widths": [4, 8, 16, 32, 64, 128], "ns": [256, 512, 1024, 2048, 4096]},
        },
        "width_n": 4096,
        "n_width": {"linear": 256, "gaussian": 256, "ksg": 32, "mlp": 16},
        "ksg_width_n": 2048,
        "mlp_width_n": 2048,
        "ratio_runs": RATIO_RUNS,
        "ratio_n": 4096,
        "lenet_calib": 2048,
        "lenet_sparsities": [0.5, 0.7, 0.9],
        "seeds": [0, 1, 2],
        "oneshot_calib": 4096,
        "vgg_widths": None,
        "vgg_epochs": 10,
    },
}
TRAIN = TrainConfig(epochs=3, lr=0.05)
FINETUNE = TrainConfig(epochs=1, lr=0.05)
THRESHOLD = {"linear": 1e-3, "gaussian": 1e-2, "ksg": 1e-2, "mlp": 1e-3}


def log(msg: str) -> None:
    print(msg, flush=True)


def say(event: ProgressEvent) -> None:
    """Print the lasting progress lines of a slow pass (the mlp estimator's)."""
    if not event.transient:
        log(f"      {event.message}")


# ------------------------------------------------------------------------------- scaling


def synthetic_layer(n: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, width) = ReLU(z A + noise) from 32 factors; y (n, width) = ReLU(x W + noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    x = torch.relu(z @ torch.randn(32, width, generator=g) / math.sqrt(32)
                   + 0.3 * torch.randn(n, width, generator=g))  # fmt: skip
    y = torch.relu(x @ torch.randn(width, width, generator=g) / math.sqrt(width)
                   + 0.3 * torch.randn(n, width, generator=g))  # fmt: skip
    return x, y


def time_selection(name: str, n: int, width: int) -> dict:
    x, y = synthetic_layer(n, width)
    est = make_estimator(name, seed=0)
    t = time.perf_counter()
    prepared = est.prepare(x, y)
    t_prep = time.perf_counter() - t
    t = time.perf_counter()
    result = terc(est.start(prepared), threshold=THRESHOLD[name])
    t_sel = time.perf_counter() - t
    return {
        "estimator": name,
        "n": n,
        "width": width,
        "prepare_s": round(t_prep, 4),
        "select_s": round(t_sel, 4),
        "total_s": round(t_prep + t_sel, 4),
        "kept": result.n_kept,
    }


def part_scaling(prof: dict) -> list[dict]:
    rows = []
    for name in prof["scaling"]:  # warm-up: first LAPACK / allocator calls are slow
        time_selection(name, 256, 4)
    for name, grid in prof["scaling"].items():
        n_fixed = {"ksg": prof["ksg_width_n"], "mlp": prof["mlp_width_n"]}.get(
            name, prof["width_n"]
        )
        for width in grid["widths"]:
            rows.append({"sweep": "width", **time_selection(name, n_fixed, width)})
            log(f"  scaling {name:8s} width {width:5d} n {n_fixed:6d}: {rows[-1]['total_s']:.3f} s")
        for n in grid["ns"]:
            rows.append({"sweep": "n", **time_selection(name, n, prof["n_width"][name])})
            log(f"  scaling {name:8s} width {prof['n_width'][name]:5d} n {n:6d}: "
                f"{rows[-1]['total_s']:.3f} s")  # fmt: skip
    return rows


# ------------------------------------------------------------------------------- ratio


def forward_time(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    return time.perf_counter() - t


def pieces_time(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> float:
    """The same forward pass as mipp's capture runs it on a CPU: each batch in pieces sized to
    the activations (mipp.surgery.capture.CPU_PIECE_BYTES), nothing recorded."""
    t = time.perf_counter()
    stream_activations(model, x.split(batch), {}, on_batch=lambda acts: None)
    return time.perf_counter() - t


PHASES = ("structure", "capture", "statistics", "selection", "removal", "verify")


def part_ratio(prof: dict) -> list[dict]:
    ds = data.load_dataset("fashion-mnist", split="train", pad_to_32=True)
    pool = ds.x[torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))]
    rows = []
    by_model: dict[tuple[str, int], list[tuple[str, str, int | None]]] = {}
    for name, scope, estimator, size, *rest in prof["ratio_runs"]:
        k = rest[0] if rest else None
        by_model.setdefault((name, size or prof["ratio_n"]), []).append((scope, estimator, k))
    for (name, n), runs in by_model.items():
        x = pool[:n]
        with seeded(0):
            net = models.create(name, in_channels=1, input_size=32).eval()
        forward_time(net, x[:256])  # warm-up
        before = forward_time(net, x)
        before_pieces = pieces_time(net, x)
        timed = []
        for scope, estimator, k in runs:
            t = time.perf_counter()
            how = MIPP(estimator=estimator, reconstruct=False, stream_features=k)
            result = prune(net, x, method=how, sparsity=0.5, scope=scope, calib_samples=n,
                           batch_size=256)  # fmt: skip
            timed.append((scope, estimator, k, time.perf_counter() - t, result.report))
        after = forward_time(net, x)
        after_pieces = pieces_time(net, x)
        floor = min(before, after)
        # the fastest plain forward pass we know: batches of 256, or the capture's pieces
        best = min(floor, before_pieces, after_pieces)
        for scope, estimator, k, total, report in timed:
            tm = report.timings
            rows.append({
                "model": name,
                "scope": scope,
                "stream_features": "all" if k is None else k,
                "n": n,
                "estimator": estimator,
                "groups": len(report.groups),
                "widest_group": max(g.width_before for g in report.groups),
                "forward_s": round(floor, 3),
                "forward_pieces_s": round(min(before_pieces, after_pieces), 3),
                "prune_total_s": round(total, 3),
                "ratio": round(total / floor, 3),
                "ratio_vs_fastest_forward": round(total / best, 3),
                "selection_per_forward": round(tm["selection"] / floor, 3),
                "structure_s": round(tm["structure"], 3),
                "capture_s": round(tm["capture"], 3),
                "statistics_s": round(tm["statistics"], 3),
                "selection_s": round(tm["selection"], 3),
                "removal_s": round(tm["removal"], 3),
                "verify_s": round(tm.get("verify", 0.0), 3),
                "other_s": round(total - sum(tm.get(k, 0.0) for k in PHASES), 3),
                "bisection_passes": len(report.bisection),
                "units_removed": round(report.achieved["units"], 4),
                "macs_removed": round(report.achieved["macs"], 4),
                # the residual streams' widths after pruning (scope "all"), input → output
                "stream_widths": "-".join(str(g.width_after) for g in reversed(report.groups)
                                          if g.kind == "stream"),
            })  # fmt: skip
            sel = tm["selection"]
            log(f"  ratio {name} {scope} k={k} {estimator}: prune {total:.1f} s / forward "
                f"{floor:.1f} s = {total / floor:.2f}, / forward in pieces "
                f"{min(before_pieces, after_pieces):.1f} s = {total / best:.2f} "
                f"(selection {sel:.1f} s)")  # fmt: skip
    return rows


# ------------------------------------------------------------------------------- lenet


def _widths(report) -> str:
    return "-".join(str(g.width_after) for g in reversed(report.groups))


def part_lenet(prof: dict, train_ds, test_ds) -> tuple[list[dict], dict]:
    rows, cache = [], {}
    for seed in prof["seeds"]:
        with seeded(seed):
            base = models.create("lenet5", in_channels=1, input_size=28)
        train(base, train_ds, TrainConfig(**{**TRAIN.to_dict(), "seed": seed}))
        base_acc = evaluate(base, test_ds).top1
        cache[seed] = (base, base_acc)
        log(f"  lenet seed {seed}: trained, test accuracy {base_acc:.4f}")
        for s in prof["lenet_sparsities"]:
            out = {}
            for est in ("linear", "mlp"):
                t = time.perf_counter()
                how = MIPP(estimator=est, reconstruct=False)  # as committed: no repair
                res = prune(base, train_ds, method=how, sparsity=s, seed=seed,
                            calib_samples=prof["lenet_calib"], tolerance=0.01,
                            progress=say if est == "mlp" else None)  # fmt: skip
                elapsed = time.perf_counter() - t
                one_shot = evaluate(res.model, test_ds).top1
                train(res.model, train_ds, FINETUNE)
                out[est] = (res.report, elapsed, one_shot, evaluate(res.model, test_ds).top1)
                log(f"    {est} {s:.0%}: {elapsed:.2f} s, widths {_widths(res.report)}, "
                    f"fine-tuned {out[est][3]:.4f}")  # fmt: skip
            (lin, t_lin, os_lin, acc_lin), (mlp, t_mlp, os_mlp, acc_mlp) = out["linear"], out["mlp"]
            jac = []
            for gl, gm in zip(reversed(lin.groups), reversed(mlp.groups), strict=True):
                a, b = set(gl.kept), set(gm.kept)
                jac.append(len(a & b) / len(a | b))
            rows.append({
                "seed": seed,
                "requested": s,
                "units_removed_linear": round(lin.achieved["units"], 4),
                "units_removed_mlp": round(mlp.achieved["units"], 4),
                "widths_linear": _widths(lin),
                "widths_mlp": _widths(mlp),
                "jaccard_per_layer": "-".join(f"{j:.2f}" for j in jac),
                "time_linear_s": round(t_lin, 3),
                "time_mlp_s": round(t_mlp, 3),
                "time_ratio": round(t_mlp / t_lin, 1),
                "passes_linear": len(lin.bisection),
                "passes_mlp": len(mlp.bisection),
                "accuracy_unpruned": round(base_acc, 4),
                "one_shot_linear": round(os_lin, 4),
                "one_shot_mlp": round(os_mlp, 4),
                "finetuned_linear": round(acc_lin, 4),
                "finetuned_mlp": round(acc_mlp, 4),
                "finetuned_gap_pt": round(100 * (acc_lin - acc_mlp), 2),
            })  # fmt: skip
            r = rows[-1]
            log(f"  lenet {s:.0%}: mlp/linear time {r['time_ratio']}x, Jaccard "
                f"{r['jaccard_per_layer']}, gap {r['finetuned_gap_pt']} pt")  # fmt: skip
    return rows, cache


# ------------------------------------------------------------------------------- one-shot

VARIANTS = {
    "none": {},
    "compensate": {"compensate": True},
    "recalibrate_bn": {"recalibrate_bn": True},
    "both": {"compensate": True, "recalibrate_bn": True},
}


def part_oneshot(prof: dict, lenet_cache: dict, train_ds, test_ds) -> list[dict]:
    rows = []
    train32 = data.load_dataset("fashion-mnist", split="train", pad_to_32=True)
    test32 = data.load_dataset("fashion-mnist", split="test", pad_to_32=True)
    with seeded(0):
        vgg = models.create("vgg11", in_channels=1, input_size=32, widths=prof["vgg_widths"])
    t = time.perf_counter()
    train(vgg, train32, TrainConfig(epochs=prof["vgg_epochs"], lr=0.05))
    log(f"  oneshot: VGG-11 trained in {time.perf_counter() - t:.0f} s")
    if 0 not in lenet_cache:
        with seeded(0):
            base = models.create("lenet5", in_channels=1, input_size=28)
        train(base, train_ds, TRAIN)
        lenet_cache[0] = (base, evaluate(base, test_ds).top1)
    cases = [("lenet5", lenet_cache[0][0], train_ds, test_ds),
             ("vgg11", vgg, train32, test32)]  # fmt: skip
    for model_name, net, tr, te in cases:
        base_acc = evaluate(net, te).top1
        for method in ("mipp", "l1"):
            for s in (0.7, 0.9):
                for variant, opts in VARIANTS.items():
                    t = time.perf_counter()
                    how = (
                        MIPP(estimator="linear", reconstruct=False) if method == "mipp" else method
                    )
                    res = prune(net, tr, method=how, sparsity=s,
                                calib_samples=prof["oneshot_calib"], **opts)  # fmt: skip
                    elapsed = time.perf_counter() - t
                    acc = evaluate(res.model, te).top1
                    rows.append({
                        "model": model_name,
                        "method": method,
                        "requested": s,
                        "units_removed": round(res.report.achieved["units"], 4),
                        "variant": variant,
                        "accuracy_unpruned": round(base_acc, 4),
                        "accuracy_one_shot": round(acc, 4),
                        "prune_s": round(elapsed, 3),
                        "repair_s": round(res.report.timings.get("compensation", 0.0)
                                          + res.report.timings.get("recalibration", 0.0), 3),
                    })  # fmt: skip
                    log(f"  oneshot {model_name} {method} {s:.0%} {variant:14s}: {acc:.4f}")
    return rows


# ------------------------------------------------------------------------------- plots


def plot(results: dict, path: Path, profile: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    colors = {"linear": "C0", "gaussian": "C1", "ksg": "C2", "mlp": "C3"}
    scaling = results.get("scaling", [])
    for ax, sweep, xlabel in ((axes[0, 0], "width", "layer width U (units)"),
                              (axes[0, 1], "n", "calibration samples N")):  # fmt: skip
        for name, c in colors.items():
            pts = [r for r in scaling if r["sweep"] == sweep and r["estimator"] == name]
            if pts:
                fixed = pts[0]["n"] if sweep == "width" else pts[0]["width"]
                label = f"{name} ({'N' if sweep == 'width' else 'U'}={fixed})"
                ax.loglog([r[sweep] for r in pts], [r["total_s"] for r in pts], "o-",
                          color=c, label=label)  # fmt: skip
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("selection wall time per layer (s)")
        ax.set_title(f"MIPP selection cost vs {'width' if sweep == 'width' else 'N'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0, 2]
    ratio = results.get("ratio", [])
    if ratio:
        parts = [
            "structure_s",
            "capture_s",
            "statistics_s",
            "selection_s",
            "removal_s",
            "verify_s",
            "other_s",
        ]
        bottom = [0.0] * len(ratio)
        labels = [
            f"{r['model']}\n{r.get('estimator', 'linear')[:3]} N={r['n']}"
            + ("" if r.get("scope", "internal") == "internal" else "\nall")
            + ("" if r.get("stream_features", "all") == "all" else f" k={r['stream_features']}")
            for r in ratio
        ]
        for k in parts:
            vals = [r.get(k, 0.0) / r["forward_s"] for r in ratio]
            ax.bar(labels, vals, bottom=bottom, label=k[:-2])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.axhline(1.0, color="k", lw=1, ls=":")
        ax.axhline(1.5, color="r", lw=1, ls="--", label="goal 1.5")
        top = 3.0  # a taller bar is cut here and labelled with its value
        for i, r in enumerate(ratio):
            label = f"{r['ratio']:.2f}×"
            if r["ratio"] > top:
                label = f"{label}\n(cut)"
            ax.text(i, min(r["ratio"], top - 0.35) + 0.03, label, ha="center", fontsize=7)
        ax.set_ylim(0, top)
        ax.set_ylabel("time / one forward pass of the calibration set")
        ax.set_title("prune() / forward of the same N images (no reconstruction)")
        ax.tick_params(axis="x", labelsize=6)
        ax.legend(fontsize=7)
    lenet = results.get("lenet", [])
    ax = axes[1, 0]
    if lenet:
        r = lenet[0]
        ax.bar(["linear", "mlp (paper's)"], [r["time_linear_s"], r["time_mlp_s"]],
               color=["C0", "C3"])  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("prune() wall time (s), target mode")
        ax.set_title(f"LeNet-5 {r['requested']:.0%}: mlp / linear = {r['time_ratio']:.0f}×")
        ax = axes[1, 1]
        layers = ["conv1", "conv2", "fc1", "fc2"]
        for k, r in enumerate(lenet):
            jac = [float(v) for v in r["jaccard_per_layer"].split("-")]
            ax.bar([i + 0.8 * k / len(lenet) for i in range(4)], jac, width=0.8 / len(lenet),
                   label=f"seed {r['seed']} {r['requested']:.0%}: fine-tuned "
                   f"{r['finetuned_linear']:.3f} vs {r['finetuned_mlp']:.3f}")  # fmt: skip
        ax.set_xticks(range(4), layers)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("Jaccard(kept by linear, kept by mlp)")
        ax.set_title("same units? linear vs mlp on LeNet-5")
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    oneshot = results.get("oneshot", [])
    if oneshot:
        keys = sorted({(r["model"], r["method"], r["requested"]) for r in oneshot},
                      key=lambda k: (k[0], k[1] != "mipp", k[2]))  # fmt: skip
        width = 0.2
        for j, variant in enumerate(VARIANTS):
            vals = []
            for k in keys:
                hit = [r for r in oneshot if (r["model"], r["method"], r["requested"]) == k
                       and r["variant"] == variant]  # fmt: skip
                vals.append(hit[0]["accuracy_one_shot"] if hit else float("nan"))
            ax.bar([i + (j - 1.5) * width for i in range(len(keys))], vals, width, label=variant)
        ax.set_xticks(range(len(keys)), [f"{m}\n{me} {s:.0%}" for m, me, s in keys], fontsize=7)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("one-shot test accuracy (no re-training)")
        ax.set_title("one-shot repairs")
        ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.suptitle(f"selection_cost.py --profile {profile}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    parser.add_argument(
        "--ratio-models",
        nargs="+",
        default=None,
        help="ratio part: measure only these models again, keeping the other rows",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = PROFILES[args.profile]
    stem = args.out / f"selection_cost_{args.profile}"
    json_path = Path(f"{stem}.json")

    if args.plot_only:
        plot(json.loads(json_path.read_text())["parts"], Path(f"{stem}.png"), args.profile)
        return 0
    previous = json.loads(json_path.read_text())["parts"] if json_path.exists() else {}
    results: dict[str, list[dict]] = dict(previous)
    commands = dict(json.loads(json_path.read_text()).get("commands", {})) if previous else {}
    command = "python benchmarks/selection_cost.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    train_ds = test_ds = None
    if {"lenet", "oneshot"} & set(args.parts):
        train_ds = data.load_dataset("fashion-mnist", split="train")
        test_ds = data.load_dataset("fashion-mnist", split="test")
    lenet_cache: dict = {}
    for part in PARTS:
        if part not in args.parts:
            continue
        log(f"part {part}")
        t = time.perf_counter()
        if part == "scaling":
            rows = part_scaling(prof)
        elif part == "ratio" and args.ratio_models:
            # only these models' rows are measured again; the others are kept as they were
            runs = [r for r in prof["ratio_runs"] if r[0] in args.ratio_models]
            if not runs:
                parser.error(f"--ratio-models: none of {args.ratio_models} is in RATIO_RUNS")
            fresh = part_ratio({**prof, "ratio_runs": runs})
            kept = [r for r in results.get("ratio", []) if r["model"] not in args.ratio_models]
            for r in kept:  # rows measured before these columns existed
                r.setdefault("stream_features", "all")
                r.setdefault("macs_removed", "")
                r.setdefault("stream_widths", "")
            order = [name for name, *_ in prof["ratio_runs"]]
            rows = sorted([*kept, *fresh], key=lambda r: order.index(r["model"]))
        elif part == "ratio":
            rows = part_ratio(prof)
        elif part == "lenet":
            rows, lenet_cache = part_lenet(prof, train_ds, test_ds)
        else:
            rows = part_oneshot(prof, lenet_cache, train_ds, test_ds)
        results[part] = rows
        made_by = command
        if part == "ratio" and args.ratio_models and part in commands:  # rows of two runs
            made_by = f"{commands[part]['command']} && {command}"
        commands[part] = {"command": made_by, "seconds": round(time.perf_counter() - t, 1)}
        write_results(Path(f"{stem}_{part}"), rows, {"command": made_by, "part": part})
        record = {
            "profile": args.profile,
            "commands": commands,
            "parts": results,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        }
        json_path.write_text(json.dumps(record, indent=1) + "\n")
        plot(results, Path(f"{stem}.png"), args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
