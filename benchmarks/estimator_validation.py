"""Every estimator on data with known answers: the validation suite of the tests, at scale.

    python benchmarks/estimator_validation.py --profile quick   # a few minutes on 2 CPU cores
    python benchmarks/estimator_validation.py --profile full    # more n, 5 seeds

Cases come from :mod:`mipp.testing.estimators` (the tests use the same generators):
Gaussian MI and conditional MI with closed forms, independence, monotone transforms of x
(MI unchanged), a dependence only through x² (the closed forms cannot see it), and the
planted-structure layer (which units TERC keeps). For each estimator, case, n and seed we
record Δ of the queried unit, its p-value and the truth on the estimator's scale (nats for
``gaussian`` / ``ksg``, share of the target's variance for ``linear`` / ``mlp``).

Writes ``benchmarks/results/estimator_validation_<profile>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
from _results import write_results

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mipp.estimators import make_estimator
from mipp.methods.selection import terc
from mipp.testing.estimators import evaluate, planted_layer, suite

OUT = Path(__file__).parent / "results"
PROFILES = {
    "quick": {"ns": [1000, 4000], "seeds": [0, 1, 2], "planted_n": 2000},
    "full": {"ns": [500, 1000, 4000, 16000], "seeds": [0, 1, 2, 3, 4], "planted_n": 4000},
}
ESTIMATORS = ["linear", "gaussian", "ksg", "mlp"]
SCALE = {"linear": "share", "mlp": "share", "gaussian": "nats", "ksg": "nats"}
MAX_N = {"ksg": 4000, "mlp": 4000}  # O(n²) memory / slow fits beyond this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    prof = PROFILES[args.profile]
    stem = args.out / f"estimator_validation_{args.profile}"
    if args.plot_only:
        plot(json.loads(Path(f"{stem}.json").read_text())["rows"], Path(f"{stem}.png"))
        return 0
    rows = []
    for n in prof["ns"]:
        for seed in prof["seeds"]:
            for case in suite(n=n, seed=seed):
                for name in ESTIMATORS:
                    if n > MAX_N.get(name, n):
                        continue
                    out = evaluate(make_estimator(name, seed=seed), case)
                    truth = case.nats if SCALE[name] == "nats" else case.share
                    if name == "mlp" and case.family == "square":
                        truth = None  # the share is a *linear* predictor's; mlp's is not 0
                    rows.append({
                        "kind": "case",
                        "family": case.family,
                        "case": case.name,
                        "n": n,
                        "seed": seed,
                        "estimator": name,
                        "value": round(out.value, 5),
                        "truth": None if truth is None else round(truth, 5),
                        "error": None if truth is None else round(out.value - truth, 5),
                        "pvalue": out.pvalue,
                        "dependent": case.dependent,
                        "seconds": round(out.seconds, 4),
                    })  # fmt: skip
            print(f"n={n} seed={seed}: {len(rows)} rows", flush=True)
    for seed in prof["seeds"]:
        for nonlinear in (False, True):
            layer = planted_layer(n=prof["planted_n"], nonlinear=nonlinear, seed=seed)
            for name in ESTIMATORS:
                est = make_estimator(name, seed=seed)
                prepared = est.prepare(layer.x, layer.y)
                for mode in ({"confidence": 0.95}, {"threshold": 0.01}):
                    t = time.perf_counter()
                    res = terc(est.start(prepared), **mode)
                    rows.append({
                        "kind": "planted",
                        "family": "planted-nonlinear" if nonlinear else "planted",
                        "case": f"planted n={prof['planted_n']} "
                        + ("tanh" if nonlinear else "linear"),
                        "n": prof["planted_n"],
                        "seed": seed,
                        "estimator": name,
                        "value": float(res.n_kept),
                        "truth": 6.0,
                        "error": float(res.n_kept - 6),
                        "pvalue": None,
                        "dependent": layer.recovered(res.support),
                        "seconds": round(time.perf_counter() - t, 4),
                        "mode": "confidence 0.95" if "confidence" in mode else "threshold 0.01",
                    })  # fmt: skip
        print(f"planted seed={seed} done", flush=True)
    args_given = sys.argv[1:] if argv is None else argv
    meta = {"command": "python benchmarks/estimator_validation.py " + " ".join(args_given)}
    for r in rows:
        r.setdefault("mode", "")
    write_results(stem, rows, meta)
    plot(rows, Path(f"{stem}.png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    colors = {"linear": "C0", "gaussian": "C1", "ksg": "C2", "mlp": "C3"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    for ax, scale in ((axes[0], "nats"), (axes[1], "share")):
        for name, c in colors.items():
            if SCALE[name] != scale:
                continue
            pts = [r for r in rows if r["kind"] == "case" and r["estimator"] == name
                   and r["truth"] is not None and r["family"] != "square"]  # fmt: skip
            ax.scatter([r["truth"] for r in pts], [r["value"] for r in pts], s=12, color=c,
                       label=name, alpha=0.7)  # fmt: skip
        top = max([r["truth"] for r in rows if r["truth"] is not None and r["kind"] == "case"]
                  + [1.0])  # fmt: skip
        ax.plot([0, top], [0, top], "k:", lw=1)
        ax.set_xlabel(f"truth ({scale})")
        ax.set_ylabel("estimate")
        ax.set_title(f"Gaussian, independent and monotone cases ({scale})")
        ax.legend()
    ax = axes[2]
    for i, name in enumerate(colors):
        pts = [r for r in rows if r["family"] == "square" and r["estimator"] == name]
        ax.scatter([i] * len(pts), [r["value"] for r in pts], color=colors[name])
    ax.set_xticks(range(4), list(colors))
    ax.set_ylabel("Δ of the unit that acts only through x²")
    ax.set_title("x²-only dependence (linear share is 0 by construction)")
    ax = axes[3]
    for j, mode in enumerate(("confidence 0.95", "threshold 0.01")):
        rates = []
        for name in colors:
            pts = [r for r in rows if r["kind"] == "planted" and r["estimator"] == name
                   and r["mode"] == mode]  # fmt: skip
            rates.append(sum(bool(r["dependent"]) for r in pts) / max(len(pts), 1))
        ax.bar([i + 0.4 * j - 0.2 for i in range(4)], rates, 0.4, label=mode)
    ax.set_xticks(range(4), list(colors))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of planted layers recovered exactly")
    ax.set_title("planted structure (TERC)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
