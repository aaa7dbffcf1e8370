"""A finished sweep as data: loading its runs, statistics over seeds, and the CSV tables.

A sweep directory is what ``mipp sweep`` writes: ``sweep.json`` (what was run, how, and the
resolved config) and ``runs/<run_id>/metrics.json`` for every finished run; a run directory
without ``metrics.json`` is unfinished and ignored. :func:`load_sweep` reads it into rows
(one ``metrics.json`` dict per run); :func:`summarise` and :func:`best_method_summary`
aggregate them over seeds; :func:`write_runs_csv` and :func:`write_summary_csv` write the
report's two tables. The figures (:mod:`~mipp.experiments.figures`) and ``REPORT.md``
(:mod:`~mipp.experiments.markdown`) are drawn from the same rows and helpers.

Points are means over seeds; ``_std`` fields are the sample standard deviation (ddof = 1),
``nan`` for a single seed. Accuracies are top-1 fractions in [0, 1]; sparsities are shares
of units (neurons / filters), parameters or MACs removed.

The **MIPP family** of a sweep is decided by what its runs ran, not by their labels: a label
belongs to it when its runs' ``method_name`` (the prune report's method) is ``"mipp"``
(:func:`mipp_labels`). The family's *primary* label (:func:`primary_mipp`) leads every
comparison; the best label outside the family is "the best baseline".
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
    "MIPP_METHOD",
    "REGIME_NAMES",
    "TARGETS",
    "VALUES",
    "Row",
    "base_accuracy",
    "best_method_summary",
    "cost_stats",
    "finite",
    "grid_methods",
    "load_sweep",
    "mean_std",
    "mipp_labels",
    "number",
    "order_methods",
    "panels",
    "pct",
    "pick",
    "primary_mipp",
    "run_record",
    "safe_name",
    "sortable",
    "summarise",
    "sweep_reference",
    "write_csv",
    "write_runs_csv",
    "write_summary_csv",
]

#: the fields a summary groups by
KEYS = ("model", "dataset", "regime", "method", "sparsity")
#: the per-run values :func:`summarise` averages by default (``collapse`` is derived)
VALUES = (
    "units_removed",
    "params_removed",
    "macs_removed",
    "accuracy_one_shot",
    "accuracy_final",
    "prune_s",
    "collapse",
)
#: regime → (short name, what it means)
REGIME_NAMES = {
    "pat": ("PaT", "prune after training, then fine-tune"),
    "pai": ("PaI", "prune at initialisation, then train from scratch"),
}
#: axis and table wording of what a sweep's sparsity counts
TARGETS = {"units": "units", "params": "parameters", "macs": "MACs", "latency": "latency"}
#: the ``method_name`` of MIPP runs (the prune report's ``method``)
MIPP_METHOD = "mipp"
_REQUIRED = ("model", "dataset", "regime", "method", "sparsity", "seed")

Row = dict[str, Any]


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
    meta = _read_object(meta_path)
    runs_dir = root / "runs"
    run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    rows = []
    for run_dir in run_dirs:
        path = run_dir / "metrics.json"
        if not path.is_file():
            continue  # unfinished run
        row = _read_object(path)
        missing = [key for key in _REQUIRED if key not in row]
        if missing:
            raise MippError(f"{path} is not a run's metrics: missing {', '.join(missing)}")
        row.setdefault("run_id", run_dir.name)
        if "repair" not in row:  # whether the one-shot re-fit ran (older runs: from the report)
            report = run_dir / "report.json"
            options = _read_object(report).get("options", {}) if report.is_file() else {}
            row["repair"] = bool(options.get("compensate", False))
        rows.append(row)
    if not rows:
        raise MippError(
            f"no finished run in {root}: none of the {len(run_dirs)} run directories under "
            f"{runs_dir} holds a metrics.json yet"
        )
    rows.sort(key=lambda row: tuple(sortable(row.get(k)) for k in (*KEYS, "seed")))
    return meta, rows


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a MippError naming the path if it is anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MippError(f"cannot read {path}: corrupt or unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise MippError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def sortable(value: Any) -> tuple[bool, Any]:
    """A sort key that puts None after every value."""
    return (value is None, value)


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


def sweep_reference(meta: Mapping[str, Any]) -> str | None:
    """``meta["config"]["prune"]["reference"]``: the label the other methods' sparsity matched."""
    config = meta.get("config")
    prune = config.get("prune") if isinstance(config, Mapping) else None
    label = prune.get("reference") if isinstance(prune, Mapping) else None
    return label if isinstance(label, str) else None


# --------------------------------------------------------------------------- the MIPP family


def mipp_labels(rows: Iterable[Row]) -> frozenset[str]:
    """The labels of the MIPP family: those whose runs' ``method_name`` is ``"mipp"``.

    A row without ``method_name`` (older sweeps) counts by its label: only ``"mipp"``.

    >>> sorted(mipp_labels([
    ...     {"method": "ours", "method_name": "mipp"},
    ...     {"method": "mipp-like", "method_name": "l1"},
    ...     {"method": "mipp"},
    ... ]))
    ['mipp', 'ours']
    """
    return frozenset(
        row["method"]
        for row in rows
        if (row["method_name"] if "method_name" in row else row["method"]) == MIPP_METHOD
    )


def primary_mipp(
    methods: Sequence[str], family: Iterable[str], reference: str | None = None
) -> str | None:
    """The label that speaks for MIPP among ``methods``: ``reference`` (the sweep's reference
    label) when present, else ``"mipp"`` if it is in ``family``, else the first label of
    ``family`` in ``methods`` order, else None."""
    family = set(family)
    if reference is not None and reference in methods:
        return reference
    if MIPP_METHOD in methods and MIPP_METHOD in family:
        return MIPP_METHOD
    return next((m for m in methods if m in family), None)


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


def number(value: Any) -> float | None:
    """``value`` as a float, or None for None, strings and anything not a number."""
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _value(row: Row, name: str) -> float | None:
    """A run's value by name, including the derived ``collapse`` (1.0 if any layer
    collapsed), ``macs_kept`` and ``params_kept`` (fractions of the unpruned network)."""
    if name == "collapse":
        return 1.0 if row.get("collapsed") else 0.0
    if name in ("macs_kept", "params_kept"):
        base = name.removesuffix("_kept")
        after, before = number(row.get(base)), number(row.get(f"{base}_before"))
        if after is not None and before:
            return after / before
        removed = number(row.get(f"{base}_removed"))
        return None if removed is None else 1.0 - removed
    return number(row.get(name))


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
        return tuple((rank[v], "") if i == method_index else sortable(v) for i, v in enumerate(key))

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
    ``mipp_std`` (the label ``mipp`` if given and present, else :func:`primary_mipp` of the
    MIPP family, :func:`mipp_labels`; None / nan if absent), ``baseline`` /
    ``baseline_mean`` / ``baseline_std`` (best label outside the MIPP family), ``margin`` =
    ``mipp_mean - baseline_mean`` (fraction; positive: MIPP wins) and ``within_noise``
    (``|margin|`` <= the larger of the two stds).
    """
    rows = list(rows)
    family = mipp_labels(rows)
    settings: dict[tuple[Any, ...], list[Row]] = {}
    for s in summarise(rows, values=(value,), methods=methods):
        if not math.isnan(s[f"{value}_mean"]):
            key = (s["model"], s["dataset"], s["regime"], s["sparsity"])
            settings.setdefault(key, []).append(s)
    out = []
    for key in sorted(settings, key=lambda k: tuple(map(sortable, k))):
        group = settings[key]

        def mean(s: Row) -> float:
            return s[f"{value}_mean"]

        best = max(group, key=mean)
        label = primary_mipp([s["method"] for s in group], family, mipp)
        ours = next((s for s in group if s["method"] == label), None)
        baselines = [s for s in group if not (s["method"] in family or s["method"] == label)]
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


def panels(summary: Sequence[Row], *fields: str) -> list[tuple[Any, ...]]:
    """Distinct values of ``fields`` in ``summary`` (or rows), sorted with PaT before PaI."""
    seen = dict.fromkeys(tuple(s[f] for f in fields) for s in summary)
    regime = fields.index("regime") if "regime" in fields else None
    return sorted(
        seen,
        key=lambda t: tuple(
            _regime_key(v) if i == regime else sortable(v) for i, v in enumerate(t)
        ),
    )


def _regime_key(regime: str) -> tuple[int, str]:
    return ({"pat": 0, "pai": 1}.get(regime, 2), str(regime))


def pick(summary: Sequence[Row], **fields: Any) -> list[Row]:
    """The records of ``summary`` whose ``fields`` all have the given values."""
    return [s for s in summary if all(s[k] == v for k, v in fields.items())]


def cost_stats(
    rows: Sequence[Row], methods: Sequence[str]
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """Per (model, dataset): mean, std and count of ``prune_s`` per method, in method order."""
    stats: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for model, dataset in panels(rows, "model", "dataset"):
        stats[model, dataset] = {}
        for method in methods:
            found = [
                number(r.get("prune_s"))
                for r in rows
                if (r["model"], r["dataset"], r["method"]) == (model, dataset, method)
            ]
            found = [v for v in found if v is not None]
            if found:
                stats[model, dataset][method] = mean_std(found)
    return stats


def base_accuracy(rows: Sequence[Row], model: str, dataset: str) -> tuple[float, float, int]:
    """Mean, std and count over seeds of the unpruned accuracy (nan, nan, 0 if absent)."""
    per_seed: dict[Any, float] = {}
    for row in rows:
        acc = number(row.get("accuracy_base"))
        if row["model"] == model and row["dataset"] == dataset and acc is not None:
            per_seed.setdefault(row["seed"], acc)
    return mean_std(per_seed.values()) if per_seed else (math.nan, math.nan, 0)


# --------------------------------------------------------------------------- formatting


def finite(x: Any) -> bool:
    """Whether ``x`` is an int or float and finite."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def pct(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal (``"90.0 %"``), ``"–"`` if not finite."""
    return f"{100 * fraction:.1f} %" if finite(fraction) else "–"


def safe_name(text: str) -> str:
    """``text`` with every character other than ``[A-Za-z0-9._-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(text))


# --------------------------------------------------------------------------- CSV tables


def run_record(row: Row) -> Row:
    """One runs.csv row: scalars as they are, lists joined, ``layers`` as ``widths``."""
    record: Row = {}
    for key, item in row.items():
        if key == "layers":
            layers = item if isinstance(item, list) else []
            record["widths"] = "-".join(str(layer.get("after")) for layer in layers)
        elif key == "collapsed":
            record[key] = " ".join(map(str, item or []))
        elif key == "notes" and isinstance(item, list):
            record[key] = "; ".join(map(str, item))
        elif item is None or isinstance(item, (bool, int, float, str)):
            record[key] = item
    record.setdefault("collapsed", "")
    record.setdefault("widths", "")
    return record


def write_csv(path: Path, records: Sequence[Row]) -> None:
    """``records`` as a CSV table; the columns are every key, in order of first appearance."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)


def write_runs_csv(path: Path, rows: Sequence[Row]) -> None:
    """``runs.csv``: one :func:`run_record` per finished run."""
    write_csv(path, [run_record(r) for r in rows])


def write_summary_csv(path: Path, rows: Sequence[Row], methods: Sequence[str]) -> None:
    """``summary.csv``: :func:`summarise` per (model, dataset, regime, method, sparsity)."""
    write_csv(path, summarise(rows, methods=methods))
