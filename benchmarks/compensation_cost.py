"""What compensation costs, as a multiple of one forward pass: the per-layer and single-pass paths.

    python benchmarks/compensation_cost.py                 # VGG-16 and ResNet-56, 256 samples
    python benchmarks/compensation_cost.py --samples 16 --models vgg11 --out /tmp/cc  # smoke
    python benchmarks/compensation_cost.py --plot-only     # redraw the PNG from the JSON

For each model (``mipp.create_model(name, in_channels=3, input_size=32)``, seeded random
initialisation, eval mode) and ``--samples`` random 32×32 inputs (N(0, 1), seeded):

- 50 % of the units of every group of ``build_structure`` removed (a seeded random half,
  residual streams included), ``kept_outputs`` giving each producer's kept outputs;
- ``forward_s``: one forward pass of the calibration set through the original model (eval,
  no grad, batches of ``--batch-size``), the faster of one before and one after the two
  compensations (a warm-up pass first);
- ``per_layer_s`` / ``single_pass_s``: ``compensate(original, pruned, x, kept_out=...,
  batch_size=..., path=...)`` on two fresh pruned copies (ridge 1e-2, 16 locations, seed 0);
- ``*_fit_s``: the part of each spent in the least-squares arithmetic (rows added to the
  normal equations, Cholesky solves, errors: the same work in both paths, O(N·m·D²) and
  O(D³) per layer), the rest being forwards, hooks and unfolding;
- the ratios of both to ``forward_s``, the per-layer / single-pass speed-up, the number of
  forwards each path started through each network (a forward pre-hook on the model root;
  forwards stopped early count), and the largest |difference| between the two paths'
  weights (the paths are meant to agree).

Writes ``<out>/compensation_cost.{csv,json}`` (rows; the JSON also holds the command, the
machine and the date) and ``<out>/compensation_cost.png``. Times are wall-clock with
``torch.set_num_threads(--threads)`` (default: all cores) and should be taken with nothing
else running.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch
from _results import write_results
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import mipp
from mipp.surgery import repair
from mipp.surgery.repair import compensate, kept_outputs
from mipp.surgery.structure import build_structure
from mipp.zoo.training import seeded

OUT = Path(__file__).parent / "results"
STEM = "compensation_cost"


def log(msg: str) -> None:
    print(msg, flush=True)


def forward_time(model: nn.Module, x: torch.Tensor, batch: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    return time.perf_counter() - t


def pruned_copy(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[nn.Module, dict, int]:
    """``model`` with a seeded random half of every group's units removed, its ``kept_out``
    and the number of units removed."""
    pruned = copy.deepcopy(model)
    structure = build_structure(pruned, x[:2])
    gen = torch.Generator().manual_seed(seed)
    removed = {
        g.name: sorted(torch.randperm(g.size, generator=gen)[: g.size // 2].tolist())
        for g in structure.groups
    }
    kept_out = kept_outputs(structure, removed)
    structure.remove(removed)
    return pruned, kept_out, sum(len(v) for v in removed.values())


def count_forwards(model: nn.Module) -> tuple[list[int], object]:
    calls = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook)


class FitClock:
    """Time spent in the least-squares arithmetic (adding rows to the normal equations, the
    solves and the errors; the same work in both paths), by wrapping the two private
    functions of :mod:`mipp.surgery.repair` that do it, within the block."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return wrapper

    def __enter__(self) -> FitClock:
        self.saved = repair._add_batch, repair._solve
        repair._add_batch, repair._solve = (self.timed(f) for f in self.saved)
        return self

    def __exit__(self, *exc) -> None:
        repair._add_batch, repair._solve = self.saved


def run_model(name: str, n: int, batch: int, seed: int) -> dict:
    with seeded(seed):
        model = mipp.create_model(name, in_channels=3, input_size=32).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    forward_time(model, x[: min(n, batch)], batch)  # warm-up
    before = forward_time(model, x, batch)
    row: dict = {"model": name, "n": n, "batch_size": batch}
    weights = {}
    for path in ("per-layer", "single-pass"):
        pruned, kept_out, units = pruned_copy(model, x, seed)
        calls_orig, h_orig = count_forwards(model)
        calls_mine, h_mine = count_forwards(pruned)
        t = time.perf_counter()
        with FitClock() as clock:
            fits = compensate(model, pruned, x, kept_out=kept_out, batch_size=batch, path=path)
        elapsed = time.perf_counter() - t
        h_orig.remove()
        h_mine.remove()
        key = path.replace("-", "_")
        row[f"{key}_s"] = round(elapsed, 3)
        row[f"{key}_fit_s"] = round(clock.seconds, 3)
        row[f"{key}_forwards_original"] = calls_orig[0]
        row[f"{key}_forwards_pruned"] = calls_mine[0]
        row["layers_fitted"] = sum(f.skipped is None for f in fits)
        row["units_removed"] = units
        weights[path] = pruned.state_dict()
        log(f"  {name} {path}: {elapsed:.2f} s, {len(fits)} layers")
    after = forward_time(model, x, batch)
    floor = min(before, after)
    row["forward_s"] = round(floor, 4)
    row["per_layer_ratio"] = round(row["per_layer_s"] / floor, 2)
    row["single_pass_ratio"] = round(row["single_pass_s"] / floor, 2)
    row["speedup"] = round(row["per_layer_s"] / row["single_pass_s"], 2)
    row["max_weight_diff"] = max(
        float((v.double() - weights["single-pass"][k].double()).abs().max())
        for k, v in weights["per-layer"].items()
        if v.numel()
    )
    row["single_pass_ratio_without_fit"] = round(
        (row["single_pass_s"] - row["single_pass_fit_s"]) / floor, 2
    )
    log(
        f"  {name}: forward {floor:.3f} s; per-layer {row['per_layer_ratio']}×, single pass "
        f"{row['single_pass_ratio']}× one forward ({row['single_pass_ratio_without_fit']}× without "
        f"the least-squares arithmetic); speed-up {row['speedup']}×; weights differ "
        f"by at most {row['max_weight_diff']:.2e}"
    )
    return row


def plot(rows: list[dict], path: Path, command: str) -> None:
    fig, ax = plt.subplots(figsize=(1.8 + 2.4 * len(rows), 4.5))
    bars = (("forward", None, "C7"), ("single pass", "single_pass_ratio", "C0"),
            ("per layer", "per_layer_ratio", "C3"))  # fmt: skip
    width = 0.27
    for j, (label, key, color) in enumerate(bars):
        vals = [1.0 if key is None else r[key] for r in rows]
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, label=label, color=color)
        if key is not None:  # the least-squares arithmetic inside that time
            fit = [r[key.replace("ratio", "fit_s")] / r["forward_s"] for r in rows]
            ax.bar(xs, fit, width, fill=False, hatch="//", edgecolor="k", lw=0,
                   label="of which least squares" if j == 1 else None)  # fmt: skip
        for xi, v in zip(xs, vals, strict=True):
            ax.text(xi, v, f"{v:.1f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(
        range(len(rows)),
        [f"{r['model']}\n{r['layers_fitted']} layers, N={r['n']}" for r in rows],
    )
    ax.set_yscale("log")
    ax.set_ylabel("time / one forward pass of the calibration set")
    ax.set_title("compensate(): cost per path", fontsize=10)
    top = max(max(r["per_layer_ratio"], r["single_pass_ratio"]) for r in rows)
    ax.set_ylim(0.8, top * 6)  # room for the legend
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    fig.text(0.01, 0.01, command, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    parser.add_argument("--samples", type=int, default=256, help="calibration samples N")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    args = parser.parse_args(argv)
    stem = args.out / STEM
    if args.plot_only:
        record = json.loads(Path(f"{stem}.json").read_text())
        plot(record["rows"], Path(f"{stem}.png"), record["command"])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/compensation_cost.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    t = time.perf_counter()
    rows = []
    for name in args.models:
        log(f"{name}: N={args.samples}, batch {args.batch_size}")
        rows.append(run_model(name, args.samples, args.batch_size, args.seed))
    meta = {"command": command, "seconds": round(time.perf_counter() - t, 1)}
    write_results(stem, rows, meta)
    plot(rows, Path(f"{stem}.png"), command)
    log(f"wrote {stem}.csv, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
