"""Aggregate a finished pruning sweep into a results folder: tables, figures and REPORT.md.

A sweep directory is what ``mipp sweep`` writes: ``sweep.json`` (what was run, how, and the
resolved config) and ``runs/<run_id>/metrics.json`` for every finished run; a run directory
without ``metrics.json`` is unfinished and ignored. :func:`write_report` reads it and writes,
into ``results/<sweep name>/`` unless told otherwise:

- ``runs.csv``: one row per finished run, every scalar metric plus ``collapsed`` (names
  joined by spaces) and ``widths`` (kept units per layer, input -> output, as ``6-5-...``);
- ``summary.csv``: :func:`summarise` per (model, dataset, regime, method, sparsity);
- ``accuracy_<model>_<dataset>.png``: accuracy vs % units removed, one panel per stage
  (PaT one-shot, PaT fine-tuned, PaI one-shot at init, PaI trained from scratch);
- ``efficiency_<model>_<dataset>.png``: final accuracy vs remaining MACs and parameters;
- ``collapse.png``: share of runs with a fully removed layer vs % units removed;
- ``layer_profiles_<model>_<dataset>_<regime>.png``: kept ratio per layer (the paper's
  pruning-ratio figure), one panel per requested sparsity;
- ``cost.png``: mean selection time (``prune_s``, seconds) per method;
- ``REPORT.md``: how the sweep was made, its protocol, the tables, where MIPP wins or
  loses against the best baseline, and the figures.

Points are means over seeds; error bars and ``±`` are the sample standard deviation
(ddof = 1), absent when a point has one seed. Accuracies are top-1 fractions in [0, 1];
sparsities are shares of units (neurons / filters) removed.

    mipp report runs/lenet5-fmnist-quick          # the command, or from Python:
    write_report("runs/lenet5-fmnist-quick", "results/lenet5-fmnist-quick")
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mipp.errors import MippError

__all__ = [
    "KEYS",
    "TARGETS",
    "VALUES",
    "best_method_summary",
    "grid_methods",
    "is_mipp",
    "load_sweep",
    "mean_std",
    "order_methods",
    "safe_name",
    "summarise",
    "write_report",
]

KEYS = ("model", "dataset", "regime", "method", "sparsity")
VALUES = (
    "units_removed",
    "params_removed",
    "macs_removed",
    "accuracy_one_shot",
    "accuracy_final",
    "prune_s",
    "collapse",
)
# (regime, metric, panel title): the four accuracies a sweep can measure, in display order.
STAGES = (
    ("pat", "accuracy_one_shot", "PaT one-shot"),
    ("pat", "accuracy_final", "PaT fine-tuned"),
    ("pai", "accuracy_one_shot", "PaI one-shot (at init)"),
    ("pai", "accuracy_final", "PaI trained from scratch"),
)
_REGIMES = {
    "pat": ("PaT", "prune after training, then fine-tune"),
    "pai": ("PaI", "prune at initialisation, then train from scratch"),
}
_FINAL = {"pat": "after fine-tuning", "pai": "after training from scratch"}
_ONE_SHOT = {"pat": "right after pruning the trained network", "pai": "right after pruning at init"}
_REQUIRED = ("model", "dataset", "regime", "method", "sparsity", "seed")
_FIG_VALUES = (*VALUES, "macs_kept", "params_kept")

Row = dict[str, Any]
#: axis and table wording of what a sweep's sparsity counts
TARGETS = {"units": "units", "params": "parameters", "macs": "MACs"}


# --------------------------------------------------------------------------- loading


def load_sweep(sweep_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Row]]:
    """Read a sweep directory: ``(meta, rows)``.

    ``meta`` is ``sweep.json``; ``rows`` holds one ``metrics.json`` dict per finished run,
    sorted by (model, dataset, regime, method, sparsity, seed). Raises
    :class:`~mipp.errors.MippError` naming the path when ``sweep.json`` is missing or
    unreadable, a ``metrics.json`` is corrupt or lacks a key field, or no run is finished.
    """
    root = Path(sweep_dir)
    meta_path = root / "sweep.json"
    if not meta_path.is_file():
        raise MippError(
            f"{root} is not a sweep directory (no sweep.json); "
            "run `mipp sweep CONFIG --out DIR` first"
        )
    meta = _read_json(meta_path)
    runs_dir = root / "runs"
    run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    rows = []
    for run_dir in run_dirs:
        path = run_dir / "metrics.json"
        if not path.is_file():
            continue  # unfinished run
        row = _read_json(path)
        missing = [key for key in _REQUIRED if key not in row]
        if missing:
            raise MippError(f"{path} is not a run's metrics: missing {', '.join(missing)}")
        row.setdefault("run_id", run_dir.name)
        rows.append(row)
    if not rows:
        raise MippError(
            f"no finished run in {root}: none of the {len(run_dirs)} run directories under "
            f"{runs_dir} holds a metrics.json yet"
        )
    rows.sort(key=lambda row: tuple(_sortable(row.get(k)) for k in (*KEYS, "seed")))
    return meta, rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MippError(f"cannot read {path}: corrupt or unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise MippError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _sortable(value: Any) -> tuple[bool, Any]:
    return (value is None, value)


# --------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1) and count of ``values`` (float64).

    The standard deviation is ``nan`` for a single value; no value raises ``ValueError``.

    >>> mean_std([1, 2, 3, 4])
    (2.5, 1.2909944487358056, 4)
    >>> mean_std([0.5])
    (0.5, nan, 1)
    """
    array = np.asarray(list(values), dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("mean_std needs at least one value, got none")
    n = int(array.size)
    std = float(array.std(ddof=1)) if n >= 2 else math.nan
    return float(array.mean()), std, n


def order_methods(methods: Iterable[str], preferred: Sequence[str] | None = None) -> list[str]:
    """The distinct ``methods`` in the order of ``preferred``, unknown ones after, A-Z.

    >>> order_methods(["l1", "zeta", "mipp", "l1", "abc"], ["mipp", "l1"])
    ['mipp', 'l1', 'abc', 'zeta']
    """
    present = set(methods)
    known = [m for m in dict.fromkeys(preferred or ()) if m in present]
    return known + sorted(present - set(known))


def grid_methods(meta: Mapping[str, Any]) -> list[str]:
    """The method labels of ``meta["config"]["grid"]["methods"]`` in grid order ([] if absent).

    Entries may be labels or tables with a ``label`` (or ``name`` / ``method``) field.
    """
    config = meta.get("config")
    grid = config.get("grid") if isinstance(config, Mapping) else None
    entries = grid.get("methods") if isinstance(grid, Mapping) else None
    labels = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping):
            entry = entry.get("label") or entry.get("name") or entry.get("method")
        if isinstance(entry, str):
            labels.append(entry)
    return labels


def is_mipp(method: str) -> bool:
    """Whether a method label belongs to the MIPP family (``mipp``, ``mipp-order-random``...)."""
    return str(method).lower().startswith("mipp")


def _primary_mipp(methods: Sequence[str], reference: str | None = None) -> str | None:
    """``reference`` (the sweep's reference label) when present, else ``"mipp"``, else the
    first MIPP-family label, else None."""
    for label in (reference, "mipp"):
        if label is not None and label in methods:
            return label
    return next((m for m in methods if is_mipp(m)), None)


def _reference(meta: Mapping[str, Any]) -> str | None:
    """``meta["config"]["prune"]["reference"]``: the label the other methods' sparsity matched."""
    config = meta.get("config")
    prune = config.get("prune") if isinstance(config, Mapping) else None
    label = prune.get("reference") if isinstance(prune, Mapping) else None
    return label if isinstance(label, str) else None


def _value(row: Row, name: str) -> float | None:
    """A run's value by name, including the derived ``collapse``, ``macs_kept``, ``params_kept``."""
    if name == "collapse":
        return 1.0 if row.get("collapsed") else 0.0
    if name in ("macs_kept", "params_kept"):
        base = name.removesuffix("_kept")
        after, before = _number(row.get(base)), _number(row.get(f"{base}_before"))
        if after is not None and before:
            return after / before
        removed = _number(row.get(f"{base}_removed"))
        return None if removed is None else 1.0 - removed
    return _number(row.get(name))


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarise(
    rows: Iterable[Row],
    *,
    keys: Sequence[str] = KEYS,
    values: Sequence[str] = VALUES,
    methods: Sequence[str] | None = None,
) -> list[Row]:
    """Mean and sample std over the runs of each group of equal ``keys``.

    Returns one dict per group: the key fields, ``n`` (runs in the group) and, for each
    value ``v``, ``v_mean`` and ``v_std`` (``nan`` when fewer than two runs have it; runs
    where ``v`` is missing are left out of it). ``collapse`` is 1.0 for a run with any
    collapsed layer, so ``collapse_mean`` is the collapse frequency. Groups are sorted by
    ``keys``; methods follow ``methods`` (a grid order), unknown ones after, A-Z.
    """
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    method_index = keys.index("method") if "method" in keys else None
    present = [key[method_index] for key in groups] if method_index is not None else []
    rank = {m: i for i, m in enumerate(order_methods(present, methods))}

    def sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            (rank[v], "") if i == method_index else _sortable(v) for i, v in enumerate(key)
        )

    out = []
    for key in sorted(groups, key=sort_key):
        group = groups[key]
        record: Row = dict(zip(keys, key, strict=True))
        record["n"] = len(group)
        for name in values:
            found = [v for v in (_value(row, name) for row in group) if v is not None]
            mean, std, _ = mean_std(found) if found else (math.nan, math.nan, 0)
            record[f"{name}_mean"], record[f"{name}_std"] = mean, std
        out.append(record)
    return out


def best_method_summary(
    rows: Iterable[Row],
    *,
    value: str = "accuracy_final",
    methods: Sequence[str] | None = None,
    mipp: str | None = None,
) -> list[Row]:
    """Per (model, dataset, regime, sparsity): the best method and MIPP vs the best baseline.

    Each dict holds the setting, ``n`` (runs of the best method), ``best`` / ``best_mean``
    (highest mean ``value``; ties go to the earlier method), ``mipp`` / ``mipp_mean`` /
    ``mipp_std`` (the label ``mipp`` if given and present, else ``"mipp"``, else the first
    MIPP-family label; None / nan if absent), ``baseline`` / ``baseline_mean`` /
    ``baseline_std`` (best method outside the MIPP family, labels starting with "mipp"),
    ``margin`` = ``mipp_mean - baseline_mean`` (fraction;
    positive: MIPP wins) and ``within_noise`` (``|margin|`` <= the larger of the two stds).
    """
    settings: dict[tuple[Any, ...], list[Row]] = {}
    for s in summarise(rows, values=(value,), methods=methods):
        if not math.isnan(s[f"{value}_mean"]):
            key = (s["model"], s["dataset"], s["regime"], s["sparsity"])
            settings.setdefault(key, []).append(s)
    out = []
    for key in sorted(settings, key=lambda k: tuple(map(_sortable, k))):
        group = settings[key]

        def mean(s: Row) -> float:
            return s[f"{value}_mean"]

        best = max(group, key=mean)
        label = _primary_mipp([s["method"] for s in group], mipp)
        ours = next((s for s in group if s["method"] == label), None)
        baselines = [s for s in group if not (is_mipp(s["method"]) or s["method"] == label)]
        base = max(baselines, key=mean) if baselines else None
        record = dict(zip(("model", "dataset", "regime", "sparsity"), key, strict=True))
        record |= {"n": best["n"], "best": best["method"], "best_mean": mean(best)}
        for prefix, s in (("mipp", ours), ("baseline", base)):
            record[prefix] = s["method"] if s else None
            record[f"{prefix}_mean"] = mean(s) if s else math.nan
            record[f"{prefix}_std"] = s[f"{value}_std"] if s else math.nan
        record["margin"] = record["mipp_mean"] - record["baseline_mean"]
        noise = np.nanmax([record["mipp_std"], record["baseline_std"], -1.0])
        record["within_noise"] = bool(noise >= 0 and abs(record["margin"]) <= noise)
        out.append(record)
    return out


# --------------------------------------------------------------------------- the report


def write_report(
    sweep_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write the results folder of a finished sweep and return its path.

    ``out_dir`` defaults to ``results/<sweep name>`` (relative to the working directory).
    See the module docstring for the files written. Raises :class:`~mipp.errors.MippError`
    as :func:`load_sweep` does.
    """
    meta, rows = load_sweep(sweep_dir)
    name = str(meta.get("name") or Path(sweep_dir).resolve().name)
    out = Path(out_dir) if out_dir is not None else Path("results") / safe_name(name)
    out.mkdir(parents=True, exist_ok=True)
    methods = order_methods((r["method"] for r in rows), grid_methods(meta))
    _write_csv(out / "runs.csv", [_run_record(r) for r in rows])
    _write_csv(out / "summary.csv", summarise(rows, methods=methods))
    summary = summarise(rows, values=_FIG_VALUES, methods=methods)
    from mipp.experiments.figures import write_figures

    target = meta.get("config", {}).get("prune", {}).get("target", "units")
    figures = write_figures(out, rows, summary, methods, _reference(meta), target)
    text = _markdown(meta, rows, methods, figures, sweep_dir)
    (out / "REPORT.md").write_text(text, encoding="utf-8")
    return out


def safe_name(text: str) -> str:
    """``text`` with every character other than ``[A-Za-z0-9._-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(text))


def _run_record(row: Row) -> Row:
    """One runs.csv row: scalars as they are, lists joined, ``layers`` as ``widths``."""
    record: Row = {}
    for key, value in row.items():
        if key == "layers":
            layers = value if isinstance(value, list) else []
            record["widths"] = "-".join(str(layer.get("after")) for layer in layers)
        elif key == "collapsed":
            record[key] = " ".join(map(str, value or []))
        elif key == "notes" and isinstance(value, list):
            record[key] = "; ".join(map(str, value))
        elif value is None or isinstance(value, (bool, int, float, str)):
            record[key] = value
    record.setdefault("collapsed", "")
    record.setdefault("widths", "")
    return record


def _write_csv(path: Path, records: Sequence[Row]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pct(fraction: float | None) -> str:
    return f"{100 * fraction:.1f} %" if _finite(fraction) else "–"


def _acc(mean: float, std: float, n: int) -> str:
    if not _finite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 and _finite(std) else f"{mean:.3f}"


def _seconds(mean: float, std: float) -> str:
    """``mean ± std`` seconds, both to three significant digits of the mean (two from 1 s)."""
    digits = max(0, 2 - math.floor(math.log10(mean))) if mean > 0 else 3
    text = f"{mean:.{digits}f}"
    return text + f" ± {std:.{digits}f}" if _finite(std) else text


def _regime_key(regime: str) -> tuple[int, str]:
    return ({"pat": 0, "pai": 1}.get(regime, 2), str(regime))


def _panels(summary: Sequence[Row], *fields: str) -> list[tuple[Any, ...]]:
    """Distinct values of ``fields`` in ``summary``, sorted with PaT before PaI."""
    seen = dict.fromkeys(tuple(s[f] for f in fields) for s in summary)
    regime = fields.index("regime") if "regime" in fields else None
    return sorted(
        seen,
        key=lambda t: tuple(
            _regime_key(v) if i == regime else _sortable(v) for i, v in enumerate(t)
        ),
    )


def _cost_stats(
    rows: Sequence[Row], methods: Sequence[str]
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """Per (model, dataset): mean, std and count of ``prune_s`` per method, in method order."""
    stats: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for model, dataset in _panels(rows, "model", "dataset"):
        stats[model, dataset] = {}
        for method in methods:
            found = [
                _number(r.get("prune_s"))
                for r in rows
                if (r["model"], r["dataset"], r["method"]) == (model, dataset, method)
            ]
            found = [v for v in found if v is not None]
            if found:
                stats[model, dataset][method] = mean_std(found)
    return stats


def _base_accuracy(rows: Sequence[Row], model: str, dataset: str) -> tuple[float, float, int]:
    """Mean, std and count over seeds of the unpruned accuracy (nan, nan, 0 if absent)."""
    per_seed: dict[Any, float] = {}
    for row in rows:
        value = _number(row.get("accuracy_base"))
        if row["model"] == model and row["dataset"] == dataset and value is not None:
            per_seed.setdefault(row["seed"], value)
    return mean_std(per_seed.values()) if per_seed else (math.nan, math.nan, 0)


def _pick(summary: Sequence[Row], **fields: Any) -> list[Row]:
    return [s for s in summary if all(s[k] == v for k, v in fields.items())]


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
    reference: str | None,
    target: str = "units",
) -> list[str]:
    ref = _primary_mipp(present, reference)
    what = TARGETS.get(target, target)
    units = f"{what} removed: {ref} (min–max over methods)" if ref else f"{what} removed: mean"
    key = f"{target}_removed_mean"
    lines = [
        f"| requested | {units} | " + " | ".join(present) + " |",
        "| " + " | ".join(["---:"] * (2 + len(present))) + " |",
    ]
    for sparsity in sparsities:
        here = [cells[m, sparsity] for m in present if (m, sparsity) in cells]
        achieved = [s[key] for s in here if _finite(s.get(key))]
        if ref is not None:
            got = cells.get((ref, sparsity), {}).get(key)
        else:
            got = float(np.mean(achieved)) if achieved else None
        text = _pct(got)
        low, high = (f"{100 * v:.1f}" for v in (min(achieved, default=0), max(achieved, default=0)))
        if low != high:
            text += f" ({low}–{high})"
        row = [
            _acc(s[f"{value}_mean"], s[f"{value}_std"], s["n"]) if s else "–"
            for s in (cells.get((m, sparsity)) for m in present)
        ]
        lines.append(f"| {_pct(sparsity)} | {text} | " + " | ".join(row) + " |")
    return lines


def _regime_section(
    rows: Sequence[Row],
    summary: Sequence[Row],
    best: Sequence[Row],
    methods: Sequence[str],
    model: str,
    dataset: str,
    regime: str,
    reference: str | None,
) -> list[str]:
    short, long = _REGIMES.get(regime, (regime, regime))
    part = _pick(summary, model=model, dataset=dataset, regime=regime)
    present = [m for m in methods if any(s["method"] == m for s in part)]
    sparsities = sorted({s["sparsity"] for s in part})
    cells = {(s["method"], s["sparsity"]): s for s in part}
    lines = [f"### {model} on {dataset}, {short} ({long})", ""]
    base = _base_accuracy(rows, model, dataset)
    if base[2]:
        seeds = f"{base[2]} seed{'s' if base[2] != 1 else ''}"
        lines += [f"Unpruned accuracy: {_acc(*base)} ({seeds}).", ""]
    for value, what in (
        ("accuracy_final", f"Final accuracy ({_FINAL.get(regime, 'after re-training')})"),
        ("accuracy_one_shot", f"One-shot accuracy ({_ONE_SHOT.get(regime, 'before training')})"),
    ):
        if any(_finite(s[f"{value}_mean"]) for s in part):
            lines += [f"**{what}**", ""]
            table = _accuracy_table(cells, present, sparsities, value, reference, _target(rows))
            lines += [*table, ""]
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
                f"- {short} {_pct(b['sparsity'])}: {b['mipp']} {b['mipp_mean']:.3f} vs best "
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
                    f"| {method} | {_pct(sparsity)} | {len(hit)} / {len(group)} | {layers} |"
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


def _cost_section(rows: Sequence[Row], methods: Sequence[str], reference: str | None) -> list[str]:
    lines = [
        "## Cost",
        "",
        "Mean `prune_s` per method: the method's own scoring / selection work in seconds, "
        "over all runs of a model and dataset (both regimes, every sparsity).",
        "",
    ]
    for (model, dataset), stats in _cost_stats(rows, methods).items():
        if not stats:
            continue
        ref = _primary_mipp(list(stats), reference)
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


def _markdown(
    meta: Mapping[str, Any],
    rows: Sequence[Row],
    methods: Sequence[str],
    figures: Sequence[tuple[str, str]],
    sweep_dir: str | os.PathLike[str],
) -> str:
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
    reference = _reference(meta)
    best = best_method_summary(rows, methods=methods, mipp=reference)
    for model, dataset, regime in _panels(summary, "model", "dataset", "regime"):
        lines += _regime_section(rows, summary, best, methods, model, dataset, regime, reference)
    lines += _cost_section(rows, methods, reference)
    lines += ["## Figures", "", f"{seeds} Error bars: sample standard deviation over seeds.", ""]
    for caption, file in figures:
        lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines)
