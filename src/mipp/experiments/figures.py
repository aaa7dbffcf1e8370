"""The figures of a sweep report (see :mod:`mipp.experiments.report` for what each shows).

Built on :class:`matplotlib.figure.Figure` directly, so no global pyplot state or backend is
touched; every method keeps one colour and marker across all figures, the primary MIPP label
drawn as a thick black line and the other labels of the MIPP family (runs whose method is
MIPP: :func:`~mipp.experiments.results.mipp_labels`) dashed grey.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np

from mipp.experiments.results import (
    REGIME_NAMES,
    TARGETS,
    Row,
    base_accuracy,
    cost_stats,
    finite,
    mipp_labels,
    number,
    panels,
    pct,
    pick,
    primary_mipp,
    safe_name,
)

__all__ = ["STAGES", "method_styles", "write_figures"]

#: (regime, metric, panel title): the four accuracies a sweep can measure, in display order
STAGES = (
    ("pat", "accuracy_one_shot", "PaT one-shot"),
    ("pat", "accuracy_final", "PaT fine-tuned"),
    ("pai", "accuracy_one_shot", "PaI one-shot (at init)"),
    ("pai", "accuracy_final", "PaI trained from scratch"),
)

_DPI = 110
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
_PALETTE += ("#bcbd22", "#17becf", "#7f7f7f")
_MARKERS = ("s", "^", "v", "D", "P", "X", "<", ">", "h", "*")


def method_styles(
    methods: Sequence[str], family: Set[str], reference: str | None
) -> dict[str, dict[str, Any]]:
    """One look (matplotlib line keywords) per method label, the same in every figure.

    The primary MIPP label (:func:`~mipp.experiments.results.primary_mipp` of ``family``,
    the labels whose runs are MIPP's) is a thick black line, the rest of ``family`` dashed
    greys with open markers, every other label a solid line in the next palette colour.
    """
    primary = primary_mipp(methods, family, reference)
    styles, n_mipp, n_base = {}, 0, 0
    for method in methods:
        if method == primary:
            style = {"color": "black", "marker": "o", "linestyle": "-", "linewidth": 2.6}
            style |= {"markersize": 6.5, "zorder": 6}
        elif method in family:
            style = {"color": ("#404040", "#707070", "#a0a0a0")[n_mipp % 3]}
            style |= {"marker": ("o", "D", "s")[n_mipp % 3], "markerfacecolor": "white"}
            style |= {"linestyle": ("--", ":", "-.")[n_mipp % 3], "linewidth": 2.0}
            style |= {"markersize": 5.5, "zorder": 5}
            n_mipp += 1
        else:
            style = {"color": _PALETTE[n_base % len(_PALETTE)]}
            style |= {"marker": _MARKERS[n_base % len(_MARKERS)], "linestyle": "-"}
            style |= {"linewidth": 1.3, "markersize": 5, "zorder": 3}
            n_base += 1
        styles[method] = style
    return styles


def _grid(n: int, width: float, height: float, *, max_cols: int = 3) -> tuple[Any, list[Any]]:
    """A constrained-layout Figure (no pyplot, so no global state) with ``n`` panels."""
    from matplotlib.figure import Figure

    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _series(
    ax: Any,
    pts: Sequence[Row],
    method: str,
    style: Mapping[str, Any],
    x: str,
    y: str,
    *,
    x_scale: float = 1.0,
    errors: bool = True,
) -> None:
    """Means of ``y`` against means of ``x``; std error bars if ``errors`` (none where nan)."""
    if not pts:
        return
    xs = np.array([s[f"{x}_mean"] for s in pts], dtype=np.float64) * x_scale
    ys = np.array([s[f"{y}_mean"] for s in pts], dtype=np.float64)
    err = np.array([s[f"{y}_std"] for s in pts], dtype=np.float64)
    ax.plot(xs, ys, label=method, **style)
    ok = np.isfinite(err) & np.isfinite(xs) & np.isfinite(ys)
    if errors and ok.any():
        ax.errorbar(
            xs[ok],
            ys[ok],
            yerr=err[ok],
            fmt="none",
            ecolor=style["color"],
            elinewidth=1.0,
            capsize=2.5,
            zorder=style["zorder"],
        )


def _log_x(ax: Any, limits: tuple[float, float] | None = None) -> None:
    """A log x axis labelled with plain numbers (0.5, not 5 x 10^-1); call after plotting."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    if limits is not None:
        ax.set_xlim(*limits)
    low, high = ax.get_xlim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    # Label the 2..9 ticks only when the axis spans about a decade or less (else they crowd).
    narrow = low > 0 and high / low < 20
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())


def _base_line(ax: Any, base: float) -> None:
    if finite(base):
        ax.axhline(base, color="0.35", linestyle="--", linewidth=1.0, label="unpruned (mean)")


def _finish(fig: Any, axes: Sequence[Any], title: str, path: Path) -> None:
    """Grid lines, one legend for the figure, a title; save and release the figure."""
    handles: dict[str, Any] = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="outside lower center",
            ncol=min(len(handles), 6),
            fontsize="small",
            frameon=False,
        )
    fig.suptitle(title)
    fig.savefig(path, dpi=_DPI)
    fig.clear()  # made without pyplot, the figure is not registered anywhere: this frees it


def _accuracy_figure(
    path: Path,
    part: Sequence[Row],
    methods: Sequence[str],
    styles: Mapping[str, Any],
    base: float,
    title: str,
    target: str = "units",
) -> bool:
    stages = [
        stage
        for stage in STAGES
        if any(s["regime"] == stage[0] and finite(s[f"{stage[1]}_mean"]) for s in part)
    ]
    if not stages:
        return False
    fig, axes = _grid(len(stages), 4.2, 3.8, max_cols=4)
    for ax, (regime, value, label) in zip(axes, stages, strict=True):
        for method in methods:
            pts = [
                s for s in pick(part, regime=regime, method=method) if finite(s[f"{value}_mean"])
            ]
            _series(ax, pts, method, styles[method], f"{target}_removed", value, x_scale=100.0)
        _base_line(ax, base)
        ax.set(title=label, xlabel=f"{TARGETS[target]} removed (%)", ylabel="top-1 accuracy")
    _finish(fig, axes, title, path)
    return True


def _efficiency_figure(
    path: Path,
    part: Sequence[Row],
    methods: Sequence[str],
    styles: Mapping[str, Any],
    base: float,
    title: str,
) -> bool:
    regimes = [
        r
        for (r,) in panels(part, "regime")
        if any(finite(s["accuracy_final_mean"]) for s in pick(part, regime=r))
    ]
    if not regimes:
        return False
    fig, axes = _grid(2 * len(regimes), 4.6, 3.6, max_cols=2)
    for i, regime in enumerate(regimes):
        short = REGIME_NAMES.get(regime, (regime,))[0]
        for ax, x, what in zip(
            axes[2 * i : 2 * i + 2],
            ("macs_kept", "params_kept"),
            ("MACs", "parameters"),
            strict=True,
        ):
            for method in methods:
                pts = [
                    s
                    for s in pick(part, regime=regime, method=method)
                    if finite(s["accuracy_final_mean"]) and s[f"{x}_mean"] > 0
                ]
                _series(ax, pts, method, styles[method], x, "accuracy_final")
            _base_line(ax, base)
            _log_x(ax)
            ax.set(
                title=f"{short}: final accuracy vs {what}",
                ylabel="top-1 accuracy",
                xlabel=f"remaining {what} (fraction of unpruned, log)",
            )
    _finish(fig, axes, title, path)
    return True


def _collapse_figure(
    path: Path,
    summary: Sequence[Row],
    methods: Sequence[str],
    styles: Mapping[str, Any],
    target: str = "units",
) -> bool:
    cells = panels(summary, "model", "dataset", "regime")
    fig, axes = _grid(len(cells), 4.2, 3.6, max_cols=3)
    for ax, (model, dataset, regime) in zip(axes, cells, strict=True):
        for method in methods:
            pts = pick(summary, model=model, dataset=dataset, regime=regime, method=method)
            _series(
                ax,
                pts,
                method,
                styles[method],
                f"{target}_removed",
                "collapse",
                x_scale=100.0,
                errors=False,
            )
        short = REGIME_NAMES.get(regime, (regime,))[0]
        ax.set(
            title=f"{model} / {dataset} / {short}",
            xlabel=f"{TARGETS[target]} removed (%)",
            ylabel="share of runs with a collapsed layer",
            ylim=(-0.05, 1.05),
        )
    _finish(fig, axes, "Layer collapse (≥ 1 layer fully removed)", path)
    return True


def _layer_profile_figure(
    path: Path, rows: Sequence[Row], methods: Sequence[str], styles: Mapping[str, Any], title: str
) -> bool:
    """Kept ratio after / before per layer (input -> output), one panel per sparsity."""
    runs = [r for r in rows if isinstance(r.get("layers"), list) and r["layers"]]
    if not runs:
        return False
    names = list(dict.fromkeys(str(layer.get("name")) for r in runs for layer in r["layers"]))
    sparsities = sorted({r["sparsity"] for r in runs})
    fig, axes = _grid(len(sparsities), max(4.2, 0.3 * len(names) + 1.5), 3.8, max_cols=3)
    x = np.arange(len(names))
    for ax, sparsity in zip(axes, sparsities, strict=True):
        for method in methods:
            ratios: dict[str, list[float]] = {name: [] for name in names}
            for r in runs:
                if r["method"] != method or r["sparsity"] != sparsity:
                    continue
                for layer in r["layers"]:
                    before, after = number(layer.get("before")), number(layer.get("after"))
                    if before and after is not None:
                        ratios[str(layer.get("name"))].append(after / before)
            if any(ratios.values()):
                y = [float(np.mean(v)) if v else math.nan for v in ratios.values()]
                ax.plot(x, y, label=method, **styles[method])
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
        ax.set(
            title=f"{pct(sparsity)} of units requested",
            ylim=(-0.03, 1.05),
            ylabel="kept ratio (after / before)",
        )
    _finish(fig, axes, title, path)
    return True


def _cost_figure(
    path: Path, rows: Sequence[Row], methods: Sequence[str], styles: Mapping[str, Any]
) -> bool:
    stats = cost_stats(rows, methods)
    fig, axes = _grid(len(stats), 5.0, 0.4 * len(methods) + 1.6, max_cols=2)
    for ax, ((model, dataset), per_method) in zip(axes, stats.items(), strict=True):
        labels = list(per_method)
        means = [mean for mean, _, _ in per_method.values()]
        y = np.arange(len(labels))
        ax.barh(y, means, color=[styles[m]["color"] for m in labels], height=0.7)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        if means and min(means) > 0:
            _log_x(ax, (min(means) / 2, max(means) * 2))
        ax.set(title=f"{model} on {dataset}", xlabel="mean selection time prune_s (s)")
    _finish(fig, axes, "Cost of the pruning methods' own scoring / selection", path)
    return True


def write_figures(
    out: Path,
    rows: Sequence[Row],
    summary: Sequence[Row],
    methods: Sequence[str],
    reference: str | None,
    target: str = "units",
) -> list[tuple[str, str]]:
    """Write every figure into ``out``; return (caption, file name) pairs in report order.

    ``target`` (units, params or macs: what the sweep's sparsity counts) is the x axis of the
    accuracy and collapse figures."""
    styles = method_styles(methods, mipp_labels(rows), reference)
    figures: list[tuple[str, str]] = []

    def add(ok: bool, caption: str, file: str) -> None:
        if ok:
            figures.append((caption, file))

    for model, dataset in panels(summary, "model", "dataset"):
        part = pick(summary, model=model, dataset=dataset)
        base = base_accuracy(rows, model, dataset)[0]
        title = f"{model} on {dataset}"
        file = safe_name(f"accuracy_{model}_{dataset}.png")
        ok = _accuracy_figure(out / file, part, methods, styles, base, title, target)
        add(ok, f"Accuracy vs {TARGETS[target]} removed, {title}", file)
        file = safe_name(f"efficiency_{model}_{dataset}.png")
        ok = _efficiency_figure(out / file, part, methods, styles, base, title)
        add(ok, f"Final accuracy vs remaining MACs and parameters, {title}", file)
    add(
        _collapse_figure(out / "collapse.png", summary, methods, styles, target),
        "Layer-collapse frequency",
        "collapse.png",
    )
    for model, dataset, regime in panels(summary, "model", "dataset", "regime"):
        title = (
            f"Kept ratio per layer, {model} on {dataset}, {REGIME_NAMES.get(regime, (regime,))[0]}"
        )
        file = safe_name(f"layer_profiles_{model}_{dataset}_{regime}.png")
        group = [
            r for r in rows if (r["model"], r["dataset"], r["regime"]) == (model, dataset, regime)
        ]
        add(_layer_profile_figure(out / file, group, methods, styles, title), title, file)
    add(_cost_figure(out / "cost.png", rows, methods, styles), "Selection cost", "cost.png")
    return figures
