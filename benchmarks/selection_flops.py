"""How far scope "all" on ResNet-50 can go: the arithmetic of the exact selection, counted.

    python benchmarks/selection_flops.py --threads 2   # ~2 min on a 2-core CPU, alone

The ``ratio`` part of ``selection_cost.py`` measures ``prune()`` against one forward pass;
with ``scope="all"`` on ResNet-50 the selection of the residual streams keeps it above the
1.5× goal. This script runs the same prune (ResNet-50 at 32 px, 1,024 Fashion-MNIST images,
``gaussian``, 50 % of units, target mode, no reconstruction) and counts, from the matrix
shapes, the float64 products of ``gaussian``'s sample-space state (the streams wider than
twice the calibration set; docs/METHOD.md §3): every block read (K_P⁻¹X_K, N X_K and
X_KᵀV), every Woodbury update, the Z of the single-unit scores and each retarget. It also
times a float64 product of the same shape (n×n by n×384) on this host, so the count
becomes a lower bound in seconds, and sets it against the time 1.5× one forward pass leaves
after the capture, the structure phase and the statistics.

Writes ``benchmarks/results/selection_flops.{csv,json}``: one row per kind of product, and
the prune's timings, the forward pass and the bound in the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from _results import write_results
from selection_cost import forward_time, pieces_time

import mipp.estimators.gaussian as gaussian
from mipp import prune
from mipp.methods import MIPP
from mipp.metrics import count_macs
from mipp.zoo import data, models
from mipp.zoo.training import seeded

OUT = Path(__file__).parent / "results" / "selection_flops"
N = 1024
GOAL = 1.5  # prune() / one forward pass
#: the GaussianDualState methods whose products are counted
WRAPPED = ("__init__", "_restricted", "_woodbury", "single_scores", "_set_target")


class Counter:
    """Wraps :class:`~mipp.estimators.gaussian.GaussianDualState`'s products and adds up
    their flops (2 per multiply-add) from the shapes they are called with."""

    def __init__(self) -> None:
        self.flops: dict[str, float] = defaultdict(float)
        self.widths: set[int] = set()
        cls = gaussian.GaussianDualState
        missing = [n for n in WRAPPED if not callable(getattr(cls, n, None))]
        if missing:
            raise RuntimeError(f"GaussianDualState.{missing[0]} is gone: update this counter")
        self._saved = {n: getattr(cls, n) for n in WRAPPED}
        flops, widths, saved = self.flops, self.widths, self._saved

        def init(state, moments, columns, *, ridge):
            xs = moments.samples[0]
            widths.add(int(xs.shape[1]))
            n, d = xs.shape
            flops["start: Gram X Xᵀ and K_P⁻¹"] += 2.0 * n * n * d + 4.0 * n**3 / 3
            return saved["__init__"](state, moments, columns, ridge=ridge)

        def restricted(state, cols):
            n, k = state._x.shape[0], len(cols)
            flops["block reads: K_P⁻¹X_K and N X_K"] += 2 * 2.0 * n * n * k
            flops["block reads: X_Kᵀ V"] += 2 * 2.0 * n * k * k
            return saved["_restricted"](state, cols)

        def woodbury(state, cols, vs, inners=None):
            n, k = state._x.shape[0], len(cols)
            flops["removals: Woodbury updates of K_P⁻¹ and N"] += len(vs) * (
                2.0 * n * n * k + n * k * k + k**3 / 3
            )
            return saved["_woodbury"](state, cols, vs, inners)

        def single_scores(state):
            n, d = state._x.shape
            flops["single-unit scores: Z = L⁻¹X"] += 1.0 * n * n * d + 2.0 * 2 * n * d * state._b
            return saved["single_scores"](state)

        def set_target(state, moments, ys):
            n = state._x.shape[0]
            flops["targets: Y Yᵀ, N"] += 2.0 * n * n * state._q + 5.0 * n**3 / 3
            return saved["_set_target"](state, moments, ys)

        self._wrapped = {"__init__": init, "_restricted": restricted, "_woodbury": woodbury,
                         "single_scores": single_scores, "_set_target": set_target}  # fmt: skip

    def __enter__(self) -> Counter:
        for name, fn in self._wrapped.items():
            setattr(gaussian.GaussianDualState, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(gaussian.GaussianDualState, name, fn)


def gemm_rate(n: int, k: int = 384, repeats: int = 20) -> float:
    """float64 flops per second of an (n×n)·(n×k) product on this host (best of 3)."""
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, k, dtype=torch.float64)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return repeats * 2.0 * n * n * k / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ds = data.load_dataset("fashion-mnist", split="train", pad_to_32=True)
    x = ds.x[torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))][:N]
    with seeded(0):
        net = models.create("resnet50", in_channels=1, input_size=32).eval()
    forward_time(net, x[:256])  # warm-up
    forward = min(forward_time(net, x), pieces_time(net, x))
    with Counter() as counter:
        t = time.perf_counter()
        result = prune(net, x, method=MIPP(estimator="gaussian", reconstruct=False),
                       sparsity=0.5, scope="all", calib_samples=N, batch_size=256)  # fmt: skip
        total = time.perf_counter() - t
    rate = gemm_rate(N)
    timings = result.report.timings
    dual = sum(counter.flops.values())
    rows = [
        {"product": name, "gflop": round(f / 1e9, 1), "seconds_at_gemm_rate": round(f / rate, 2)}
        for name, f in counter.flops.items()
    ]
    total_row = {"product": "total", "gflop": round(dual / 1e9, 1)}
    rows.append({**total_row, "seconds_at_gemm_rate": round(dual / rate, 2)})
    rest = total - timings["selection"]
    left = GOAL * forward - rest
    meta = {
        "command": " ".join(
            ["python benchmarks/selection_flops.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "n": N,
        "sample_space_widths": sorted(counter.widths),
        "forward_s": round(forward, 3),
        "forward_gflop_float32": round(2.0 * count_macs(net, (1, 32, 32)).macs * N / 1e9, 1),
        "prune_total_s": round(total, 3),
        "ratio": round(total / forward, 3),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "bisection_passes": len(result.report.bisection),
        "float64_gemm_gflops": round(rate / 1e9, 1),
        "sample_space_floor_s": round(dual / rate, 2),
        "selection_s_left_under_goal": round(left, 2),
        "duration_s": round(time.perf_counter() - t_start, 1),
    }
    write_results(OUT, rows, meta)
    for r in rows:
        print(f"{r['product']}: {r['gflop']} GFlop, {r['seconds_at_gemm_rate']} s")
    print(
        f"prune {total:.1f} s / forward {forward:.1f} s = {total / forward:.2f}×; selection "
        f"{timings['selection']:.1f} s; float64 GEMM {rate / 1e9:.0f} GFlop/s; the sample-space "
        f"products alone need ≥ {dual / rate:.1f} s, {GOAL}× leaves {left:.1f} s for the selection"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
