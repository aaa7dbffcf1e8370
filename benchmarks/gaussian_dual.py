"""Where ``gaussian``'s sample-space form pays: the D×D state against the n×n one.

    python benchmarks/gaussian_dual.py --threads 1   # ~2 min

One synthetic layer of 512 units × 6 features (D = 3,072, a stream read at 6 depths) with a
256-column target, both driven by 64 latent factors, at n = 768 … 2,048 samples (D/n = 4 …
1.5). For each n, side by side in one run: the time to build the starting state
(``GaussianState`` vs ``GaussianDualState``) and one TERC pass in threshold mode (relative
threshold 0.001), and whether the two kept the same units. MIPP's bisection builds a state
once and runs about 4 passes from forks of it; ``DUAL_FACTOR`` (the sample-space form for
D > 2n) is chosen from these numbers.

Writes ``benchmarks/results/gaussian_dual.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import matplotlib
import torch
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp.estimators import GaussianEstimator
from mipp.estimators.gaussian import DUAL_FACTOR, GaussianDualState, GaussianState
from mipp.estimators.moments import sample_rows
from mipp.methods.selection import terc

OUT = Path(__file__).parent / "results" / "gaussian_dual"
UNITS, FEATURES, COLUMNS, LATENTS = 512, 6, 256, 64
NS = (768, 1024, 1536, 2048)
PASSES = 4  # bisection passes of a typical prune


def layer(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = UNITS * FEATURES
    lat = torch.randn(n, LATENTS, generator=g, dtype=torch.float64)
    x = lat @ torch.randn(LATENTS, d, generator=g, dtype=torch.float64)
    x = (x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).view(n, UNITS, FEATURES)
    y = lat @ torch.randn(LATENTS, COLUMNS, generator=g, dtype=torch.float64)
    y = y + 0.1 * torch.randn(n, COLUMNS, generator=g, dtype=torch.float64)
    return x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for n in NS:
        x, y = layer(n)
        moments = GaussianEstimator().prepare(x, y)
        if moments.samples is None:  # prepare keeps the rows only past DUAL_FACTOR: force them
            moments = dataclasses.replace(moments, samples=sample_rows(moments, x, y))
        row: dict = {
            "n": n,
            "features": UNITS * FEATURES,
            "d_over_n": round(UNITS * FEATURES / n, 2),
        }
        kept = {}
        for name, cls in (("dual", GaussianDualState), ("dxd", GaussianState)):
            t = time.perf_counter()
            state = cls(moments, None, ridge=1e-3)
            row[f"{name}_start_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            result = terc(state, threshold=1e-3)
            row[f"{name}_pass_s"] = round(time.perf_counter() - t, 3)
            kept[name] = result.support
        for name in ("dual", "dxd"):
            row[f"{name}_prune_s"] = round(
                row[f"{name}_start_s"] + PASSES * row[f"{name}_pass_s"], 3
            )
        row["speedup_prune"] = round(row["dxd_prune_s"] / row["dual_prune_s"], 2)
        row["same_units"] = bool(torch.equal(kept["dual"], kept["dxd"]))
        row["kept"] = int(kept["dual"].sum())
        rows.append(row)
        print(row, flush=True)
    command = "python benchmarks/gaussian_dual.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_results(OUT, rows, {"command": command, "dual_factor": DUAL_FACTOR, "passes": PASSES})
    plot(rows, Path(f"{OUT}.png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ratio = [r["d_over_n"] for r in rows]
    for name, label in (("dual", "sample space (n×n)"), ("dxd", "D×D")):
        ax.plot(
            ratio,
            [r[f"{name}_prune_s"] for r in rows],
            "o-",
            label=f"{label}: start + {PASSES} passes",
        )
        ax.plot(ratio, [r[f"{name}_start_s"] for r in rows], "x:", label=f"{label}: start")
    ax.axvline(DUAL_FACTOR, color="k", lw=1, ls="--", label=f"switch: D > {DUAL_FACTOR}n")
    ax.set_xlabel("features per sample, D / n (D = 3,072)")
    ax.set_ylabel("seconds")
    ax.set_title("gaussian selection state: D×D vs sample space")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
