"""What running the calibration forward in pieces buys on a CPU (``CPU_PIECE_BYTES``).

    python benchmarks/capture_pieces.py --threads 1   # ~6 min

On a CPU, mipp's capture runs each calibration batch (256 samples) through the network in
pieces whose largest activation is about ``mipp.surgery.capture.CPU_PIECE_BYTES`` (8 MB):
glibc returns allocations above its mmap threshold to the kernel, so at batch 256 every large
activation is paged in afresh. For each model, side by side in one run (Fashion-MNIST
images zero-padded to 32 px, random-initialised networks, 3 repeats of each forward, the
fastest kept):

- a plain forward pass at batch 256 and the same pass in the capture's pieces (time and
  minor page faults, ``resource.getrusage``);
- ``mipp.prune(..., sparsity=0.5)`` (MIPP ``gaussian``, no reconstruction) with pieces off
  (``CPU_PIECE_BYTES = None``, what mipp did before) and on, its phases, and whether both
  kept the same units.

Writes ``benchmarks/results/capture_pieces.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import matplotlib
import torch
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp import prune
from mipp.methods import MIPP
from mipp.surgery import capture
from mipp.zoo import data, models
from mipp.zoo.training import seeded

OUT = Path(__file__).parent / "results" / "capture_pieces"
#: (model, scope, calibration samples)
RUNS = [("vgg16", "internal", 1024), ("resnet56", "internal", 1024), ("resnet50", "internal", 512)]
BATCH = 256
REPEATS = 3


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, *args) -> tuple[float, int]:
    """(seconds, minor page faults) of the fastest of REPEATS calls of ``fn(*args)``."""
    best = (float("inf"), 0)
    for _ in range(REPEATS):
        f, t = faults(), time.perf_counter()
        fn(*args)
        best = min(best, (time.perf_counter() - t, faults() - f))
    return best


def plain(net: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            net(x[i : i + BATCH])


def pieces(net: torch.nn.Module, x: torch.Tensor) -> None:
    capture.stream_activations(net, x.split(BATCH), {}, on_batch=lambda acts: None)


def one_prune(net: torch.nn.Module, x: torch.Tensor, scope: str, piece_bytes: int | None):
    saved = capture.CPU_PIECE_BYTES
    capture.CPU_PIECE_BYTES = piece_bytes
    try:
        f, t = faults(), time.perf_counter()
        how = MIPP(estimator="gaussian", reconstruct=False)
        result = prune(net, x, method=how, sparsity=0.5, scope=scope, calib_samples=len(x),
                       batch_size=BATCH)  # fmt: skip
        return time.perf_counter() - t, faults() - f, result.report
    finally:
        capture.CPU_PIECE_BYTES = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the models")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/capture_pieces.py " + " ".join(given)
    ds = data.load_dataset("fashion-mnist", split="train", pad_to_32=True)
    pool = ds.x[torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))]
    rows = []
    for name, scope, n in RUNS:
        if args.models and name not in args.models:
            continue
        x = pool[:n]
        with seeded(0):
            net = models.create(name, in_channels=1, input_size=32).eval()
        plain(net, x[:16])  # warm-up
        t_plain, f_plain = timed(plain, net, x)
        t_pieces, f_pieces = timed(pieces, net, x)
        before_s, before_f, before = one_prune(net, x, scope, None)
        after_s, after_f, after = one_prune(net, x, scope, capture.CPU_PIECE_BYTES)
        same = [g.kept for g in before.groups] == [g.kept for g in after.groups]
        row = {
            "model": name,
            "scope": scope,
            "n": n,
            "forward_batch256_s": round(t_plain, 3),
            "forward_batch256_faults": f_plain,
            "forward_pieces_s": round(t_pieces, 3),
            "forward_pieces_faults": f_pieces,
            "forward_speedup": round(t_plain / t_pieces, 3),
            "prune_batch256_s": round(before_s, 3),
            "prune_batch256_faults": before_f,
            "prune_batch256_capture_s": round(before.timings["capture"], 3),
            "prune_pieces_s": round(after_s, 3),
            "prune_pieces_faults": after_f,
            "prune_pieces_capture_s": round(after.timings["capture"], 3),
            "prune_speedup": round(before_s / after_s, 3),
            "prune_pieces_per_forward_pieces": round(after_s / t_pieces, 3),
            "prune_pieces_per_forward_batch256": round(after_s / t_plain, 3),
            "same_kept_units": same,
        }
        rows.append(row)
        print(
            f"{name}: forward {t_plain:.1f} s at batch {BATCH} ({f_plain:,} faults), "
            f"{t_pieces:.1f} s in pieces ({f_pieces:,}); prune {before_s:.1f} -> {after_s:.1f} s "
            f"(same units: {same})",
            flush=True,
        )
    write_results(OUT, rows, {"command": command, "piece_bytes": capture.CPU_PIECE_BYTES,
                              "batch": BATCH, "repeats": REPEATS})  # fmt: skip
    plot(rows, OUT.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['model']}\n{r['scope']}, n={r['n']}" for r in rows]
    series = [
        ("forward, batch 256", "forward_batch256_s"),
        ("forward, pieces", "forward_pieces_s"),
        ("prune, batch 256", "prune_batch256_s"),
        ("prune, pieces", "prune_pieces_s"),
    ]
    width = 0.2
    for k, (label, key) in enumerate(series):
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("seconds")
    ax.set_title("The calibration forward in pieces on a CPU (mipp.surgery.capture)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
