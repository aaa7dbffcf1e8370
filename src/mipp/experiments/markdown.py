"""``REPORT.md`` of a sweep: how it was made, its protocol, the tables and the figures.

:func:`render_markdown` turns the rows of :func:`~mipp.experiments.results.load_sweep` into
the report's text: per (model, dataset, regime) the final and one-shot accuracy tables (mean
± sample std over seeds), where the primary MIPP label wins or loses against the best
baseline (:func:`~mipp.experiments.results.best_method_summary`), the layer collapses; then
the selection cost per method and the figures' links.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mipp.experiments.results import (
    REGIME_NAMES,
    TARGETS,
    Row,
    base_accuracy,
    best_method_summary,
    cost_stats,
    finite,
    mipp_labels,
    panels,
    pct,
    pick,
    primary_mipp,
    summarise,
    sweep_reference,
)

__all__ = ["render_markdown"]

_FINAL = {"pat": "after fine-tuning", "pai": "after training from scratch"}
_ONE_SHOT = {"pat": "right after pruning the trained network", "pai": "right after pruning at init"}


def _acc(mean: float, std: float, n: int) -> str:
    if not finite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 and finite(std) else f"{mean:.3f}"


def _seconds(mean: float, std: float) -> str:
    """``mean ± std`` seconds, both to three significant digits of the mean (two from 1 s)."""
    digits = max(0, 2 - math.floor(math.log10(mean))) if mean > 0 else 3
    text = f"{mean:.{digits}f}"
    return text + f" ± {std:.{digits}f}" if finite(std) else text


def _seeds_line(summary: Sequence[Row]) -> str:
    ns = sorted({s["n"] for s in summary})
    if len(ns) == 1:
        return f"Each point is the mean over n = {ns[0]} seed{'s' if ns[0] != 1 else ''}."
    return f"Each point is the mean over {ns[0]} to {ns[-1]} seeds (n per point in summary.csv)."


def _target(rows: Sequence[Row]) -> str:
    """What the sweep's sparsity counts (units unless its runs say otherwise)."""
    return str(rows[0].get("target", "units")) if rows else "units"


def _accuracy_table(
    cells: Mapping[tuple[str, Any], Row],
    present: Sequence[str],
    sparsities: Sequence[Any],
    value: str,
    primary: str | None,
    target: str = "units",
) -> list[str]:
    what = TARGETS.get(target, target)
    units = (
        f"{what} removed: {primary} (min–max over methods)" if primary else f"{what} removed: mean"
    )
    key = f"{target}_removed_mean"
    lines = [
        f"| requested | {units} | " + " | ".join(present) + " |",
        "| " + " | ".join(["---:"] * (2 + len(present))) + " |",
    ]
    for sparsity in sparsities:
        here = [cells[m, sparsity] for m in present if (m, sparsity) in cells]
        achieved = [s[key] for s in here if finite(s.get(key))]
        if primary is not None:
            got = cells.get((primary, sparsity), {}).get(key)
        else:
            got = float(np.mean(achieved)) if achieved else None
        text = pct(got)
        low, high = (f"{100 * v:.1f}" for v in (min(achieved, default=0), max(achieved, default=0)))
        if low != high:
            text += f" ({low}–{high})"
        row = [
            _acc(s[f"{value}_mean"], s[f"{value}_std"], s["n"]) if s else "–"
            for s in (cells.get((m, sparsity)) for m in present)
        ]
        lines.append(f"| {pct(sparsity)} | {text} | " + " | ".join(row) + " |")
    return lines


def _regime_section(
    rows: Sequence[Row],
    summary: Sequence[Row],
    best: Sequence[Row],
    methods: Sequence[str],
    family: frozenset[str],
    model: str,
    dataset: str,
    regime: str,
    reference: str | None,
) -> list[str]:
    short, long = REGIME_NAMES.get(regime, (regime, regime))
    part = pick(summary, model=model, dataset=dataset, regime=regime)
    present = [m for m in methods if any(s["method"] == m for s in part)]
    sparsities = sorted({s["sparsity"] for s in part})
    cells = {(s["method"], s["sparsity"]): s for s in part}
    lines = [f"### {model} on {dataset}, {short} ({long})", ""]
    base = base_accuracy(rows, model, dataset)
    if base[2]:
        seeds = f"{base[2]} seed{'s' if base[2] != 1 else ''}"
        lines += [f"Unpruned accuracy: {_acc(*base)} ({seeds}).", ""]
    primary = primary_mipp(present, family, reference)
    for value, what in (
        ("accuracy_final", f"Final accuracy ({_FINAL.get(regime, 'after re-training')})"),
        ("accuracy_one_shot", f"One-shot accuracy ({_ONE_SHOT.get(regime, 'before training')})"),
    ):
        if any(finite(s[f"{value}_mean"]) for s in part):
            lines += [f"**{what}**", ""]
            table = _accuracy_table(cells, present, sparsities, value, primary, _target(rows))
            lines += [*table, ""]
    repaired = [m for m in present if all(r.get("repair") for r in rows if r["method"] == m)]
    if regime == "pat" and len(repaired) > 1 and len(repaired) < len(present):
        lines += [
            "**One-shot accuracy, every method with the same repair** (least-squares re-fit of "
            "the consumers + BatchNorm recalibration on the calibration data; no re-training)",
            "",
            *_accuracy_table(
                cells, repaired, sparsities, "accuracy_one_shot", primary, _target(rows)
            ),
            "",
        ]
    duels = [
        b
        for b in best
        if (b["model"], b["dataset"], b["regime"]) == (model, dataset, regime)
        and b["mipp"]
        and b["baseline"]
    ]
    if duels:
        label = duels[0]["mipp"]
        lines += [
            f"**Where {label} wins / loses** (final accuracy; margin = {label} minus the "
            "best baseline, in accuracy points):",
            "",
        ]
        for b in duels:
            line = (
                f"- {short} {pct(b['sparsity'])}: {b['mipp']} {b['mipp_mean']:.3f} vs best "
                f"baseline {b['baseline']} {b['baseline_mean']:.3f} "
                f"({100 * b['margin']:+.1f} pt)"
            )
            if b["within_noise"]:
                line += ", within one std"
            if b["best"] not in (b["mipp"], b["baseline"]):
                line += f"; best overall {b['best']} {b['best_mean']:.3f}"
            lines.append(line)
        wins = sum(b["margin"] > 0 for b in duels)
        clear = sum(b["margin"] > 0 and not b["within_noise"] for b in duels)
        spread = all(math.isfinite(b["mipp_std"]) for b in duels)
        lines += [
            "",
            f"{label} beats the best baseline at {wins} of {len(duels)} sparsities"
            + (f" ({clear} by more than one std)." if spread else " (one seed: no error bars)."),
            "",
        ]
    collapse = []
    for method in present:
        for sparsity in sparsities:
            group = [
                r
                for r in rows
                if (r["model"], r["dataset"], r["regime"], r["method"], r["sparsity"])
                == (model, dataset, regime, method, sparsity)
            ]
            hit = [r for r in group if r.get("collapsed")]
            if hit:
                counts = dict.fromkeys(name for r in hit for name in r["collapsed"])
                for name in counts:
                    counts[name] = sum(name in r["collapsed"] for r in hit)
                layers = ", ".join(f"{name} ({k})" for name, k in counts.items())
                collapse.append(
                    f"| {method} | {pct(sparsity)} | {len(hit)} / {len(group)} | {layers} |"
                )
    if collapse:
        lines += [
            "**Layer collapse** (runs with at least one fully removed layer):",
            "",
            "| method | requested | runs with collapse | collapsed layers (runs) |",
            "| --- | ---: | ---: | --- |",
            *collapse,
            "",
        ]
    else:
        lines += ["**Layer collapse**: no layer collapse in any run.", ""]
    return lines


def _cost_section(
    rows: Sequence[Row], methods: Sequence[str], family: frozenset[str], reference: str | None
) -> list[str]:
    lines = [
        "## Cost",
        "",
        "Mean `prune_s` per method: the method's own scoring / selection work in seconds, "
        "over all runs of a model and dataset (both regimes, every sparsity).",
        "",
    ]
    for (model, dataset), stats in cost_stats(rows, methods).items():
        if not stats:
            continue
        ref = primary_mipp(list(stats), family, reference)
        ref_mean = stats[ref][0] if ref else math.nan
        lines += [f"**{model} on {dataset}**", ""]
        lines.append("| method | prune_s (s) | runs |" + (f" × {ref} |" if ref else ""))
        lines.append("| --- | ---: | ---: |" + (" ---: |" if ref else ""))
        for method, (mean, std, n) in stats.items():
            row = f"| {method} | {_seconds(mean, std)} | {n} |"
            if ref:
                row += f" {mean / ref_mean:.3g} |" if ref_mean > 0 else " – |"
            lines.append(row)
        lines.append("")
    return lines


def _made_with(rows: Sequence[Row]) -> str:
    """One line: which source revisions (and torch versions) made the runs, with counts;
    runs recorded before provenance was kept count as "not recorded". Empty when no run
    says."""
    if not any(r.get("source") or r.get("mipp_version") for r in rows):
        return ""
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("source") or r.get("mipp_version"):
            what = f"`{r.get('source') or 'not a git checkout'}`"
            if r.get("torch_version"):
                what += f" (torch {r['torch_version']}, {r.get('threads', '?')} thread(s))"
        else:
            what = "not recorded"
        counts[what] = counts.get(what, 0) + 1
    parts = [f"{what}: {n} run{'s' if n != 1 else ''}" for what, n in counts.items()]
    return "Source revision of the runs: " + "; ".join(parts) + "."


def render_markdown(
    meta: Mapping[str, Any],
    rows: Sequence[Row],
    methods: Sequence[str],
    figures: Sequence[tuple[str, str]],
    sweep_dir: str | os.PathLike[str],
) -> str:
    """The text of ``REPORT.md`` for the sweep ``meta`` (``sweep.json``) and its ``rows``.

    ``methods`` is the label order of every table (grid order first), ``figures`` the
    (caption, file name) pairs to link, ``sweep_dir`` the directory named in the commands.
    """
    name = meta.get("name") or Path(sweep_dir).name
    lines = [f"# {name}", ""]
    if meta.get("description"):
        lines += [str(meta["description"]), ""]
    lines += ["## How this was made", "", "```sh"]
    if meta.get("command"):
        lines.append(str(meta["command"]))
    lines += [f"mipp report {sweep_dir}", "```", ""]
    total = meta.get("total_runs")
    facts = [f"{len(rows)} of {total} runs finished" if total else f"{len(rows)} runs finished"]
    if meta.get("config_path"):
        profile = f", profile `{meta['profile']}`" if meta.get("profile") else ""
        facts.append(f"config `{meta['config_path']}`{profile}")
    if meta.get("mipp_version"):
        facts.append(f"mipp {meta['mipp_version']}")
    if meta.get("started"):
        facts.append(f"started {meta['started']}")
    lines += ["; ".join(facts) + ".", ""]
    made = _made_with(rows)
    if made:
        lines += [made, ""]
    protocol = meta.get("protocol")
    if protocol:
        items = [protocol] if isinstance(protocol, str) else list(protocol)
        lines += ["## Protocol", "", *(f"- {item}" for item in items), ""]
    summary = summarise(rows, methods=methods)
    seeds = _seeds_line(summary)
    lines += [
        "## Results",
        "",
        f"{seeds} `±` is the sample standard deviation over seeds (ddof = 1). Accuracies "
        "are top-1 fractions; sparsities are shares of units (neurons / filters) "
        "removed, as requested and as achieved.",
        "",
    ]
    reference = sweep_reference(meta)
    family = mipp_labels(rows)
    best = best_method_summary(rows, methods=methods, mipp=reference)
    for model, dataset, regime in panels(summary, "model", "dataset", "regime"):
        lines += _regime_section(
            rows, summary, best, methods, family, model, dataset, regime, reference
        )
    lines += _cost_section(rows, methods, family, reference)
    lines += ["## Figures", "", f"{seeds} Error bars: sample standard deviation over seeds.", ""]
    for caption, file in figures:
        lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines)
