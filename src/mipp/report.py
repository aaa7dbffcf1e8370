"""The record of a pruning run: data and JSON only.

A :class:`PruneReport` is data, not a pickled module: per-group widths before/after, the
removed and kept unit indices, the MI traces of the selection (single scores s_i and the
conditional Δ_i at the moment each unit was tested), the information each layer kept,
parameters / MACs before and after, and wall time per phase. It round-trips through JSON;
:func:`mipp.surgery.replay.apply_report` rebuilds the pruned architecture from it on a
freshly constructed model so that a pruned checkpoint's weights load into it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mipp._io import atomic_write_bytes
from mipp.errors import MippError

__all__ = [
    "WORK_PHASES",
    "GroupReport",
    "PruneReport",
    "ReportError",
    "check_replay_record",
    "check_report_dict",
]

FORMAT = "mipp-prune-report"
VERSION = 1
#: the ``timings`` phases that are a method's own work (what a cost comparison counts):
#: MIPP's activation capture, statistics and selection (bisection included), a scored
#: method's scoring rounds and allocation. Structure, removal, repairs and IMP's
#: re-training between rounds are not counted.
WORK_PHASES = ("capture", "statistics", "selection", "scoring", "allocation")


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf → None, tuples → lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _floats(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


@dataclass
class GroupReport:
    """What happened to one unit group (see :mod:`mipp.surgery.structure`).

    ``scores`` (s_i), ``deltas`` (Δ_i), ``relative_deltas`` and ``pvalues`` are per unit in the
    group's original index order; NaN where a unit was never tested (``min_keep`` reached).
    ``order`` is the test order. ``info_full`` / ``info_kept`` are I(X;Y) and I(X_S;Y) under
    the estimator (share of target variance for ``linear``/``mlp``, nats for ``gaussian`` and
    ``ksg``), and ``retained`` their ratio. For baselines, ``scores`` are the method's unit scores
    (higher = keep), the MI fields stay empty and ``collapsed`` says whether every unit went.
    """

    name: str
    kind: str
    producers: list[str]
    width_before: int
    width_after: int
    kept: list[int]
    removed: list[int]
    order: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    relative_deltas: list[float] = field(default_factory=list)
    pvalues: list[float] = field(default_factory=list)
    info_full: float = math.nan
    info_kept: float = math.nan
    features_per_unit: int = 1
    target_columns: int = 0
    #: every unit was removed (a baseline's layer collapse; one dead placeholder stays)
    collapsed: bool = False

    @property
    def retained(self) -> float:
        """I(X_S;Y) / I(X;Y) (1 when nothing was measurable)."""
        if not math.isfinite(self.info_full) or self.info_full <= 0:
            return 1.0
        return self.info_kept / self.info_full

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retained"] = self.retained
        return _clean(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupReport:
        _check_group(d, "groups[?]")
        known = {f.name for f in fields(cls)}
        g = cls(**{k: v for k, v in d.items() if k in known})
        for name in ("scores", "deltas", "relative_deltas", "pvalues"):
            setattr(g, name, _floats(getattr(g, name)))
        g.info_full = math.nan if g.info_full is None else float(g.info_full)
        g.info_kept = math.nan if g.info_kept is None else float(g.info_kept)
        return g


@dataclass
class PruneReport:
    """The full record of one pruning run (see the module docstring)."""

    method: str
    options: dict[str, Any]
    input_shape: list[int]
    groups: list[GroupReport]
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    requested: float | None = None
    target: str = "units"
    achieved: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    bisection: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    collapsed: list[str] = field(default_factory=list)
    #: per re-fitted layer (``compensate=True``): layer, rows, features, outputs,
    #: error_before / error_after (RSS/TSS of its pre-activations), skipped
    compensation: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def widths(self) -> dict[str, tuple[int, int]]:
        """Group name → (units before, units after)."""
        return {g.name: (g.width_before, g.width_after) for g in self.groups}

    @property
    def work_seconds(self) -> float:
        """Seconds of the method's own work: the sum of the :data:`WORK_PHASES` timings."""
        return float(sum(self.timings.get(phase, 0.0) for phase in WORK_PHASES))

    @property
    def removed(self) -> dict[str, list[int]]:
        """Group name → removed unit indices (what :func:`apply_report` replays)."""
        return {g.name: list(g.removed) for g in self.groups if g.removed}

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "version": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = [g.to_dict() for g in value] if f.name == "groups" else value
        return _clean(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneReport:
        """The report of a :meth:`to_dict` dict, checked against the schema (see
        :func:`check_report_dict`): a malformed one raises :class:`ReportError`."""
        check_report_dict(d)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["groups"] = [GroupReport.from_dict(g) for g in d["groups"]]
        return cls(**kwargs)

    def replay_record(self) -> dict[str, Any]:
        """The minimal record :func:`~mipp.surgery.replay.apply_report` needs (stored in
        checkpoint sidecars), checked by :func:`check_replay_record` (duplicate or
        out-of-range removed indices, or widths that do not add up, raise
        :class:`ReportError` naming the group)."""
        for g in self.groups:
            _check_partition(g.name, g.width_before, g.width_after, g.kept, g.removed, g.collapsed)
        return check_replay_record(
            {
                "input_shape": list(self.input_shape),
                "widths": {g.name: g.width_before for g in self.groups if g.removed},
                "removed": self.removed,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (atomically)."""
        path = Path(path)
        atomic_write_bytes(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruneReport:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"cannot read prune report {path}: {_one_line(e)}") from None
        try:
            return cls.from_dict(d)
        except ReportError as e:
            raise ReportError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- schema


class ReportError(MippError, ValueError):
    """A prune report (or a replay record) does not follow the schema; the message names the
    field, what it holds and what is valid."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value) if not isinstance(value, dict | list) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    """``list [1, 2]``, ``str 'x'``, ``null``: the type and (shortened) value."""
    return "null" if value is None else f"{type(value).__name__} {_show(value)}"


def _bad(where: str, want: str, value: Any) -> ReportError:
    return ReportError(f"prune report field {where!r} must be {want}, got {_kind(value)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(d: Mapping[str, Any], key: str, where: str, *, low: int = 0) -> int:
    v = d[key]
    if not _is_int(v) or v < low:
        raise _bad(f"{where}{key}", f"an integer >= {low}", v)
    return v


def _num_or_null(v: Any, where: str, *, low: float = -math.inf, high: float = math.inf) -> None:
    if v is None:
        return
    if not _is_num(v) or not (math.isnan(v) or low <= v <= high):
        want = (
            "a number or null"
            if math.isinf(low) and math.isinf(high)
            else (f"a number in [{low:g}, {high:g}] or null")
        )
        raise _bad(where, want, v)


def _str(v: Any, where: str) -> None:
    if not isinstance(v, str):
        raise _bad(where, "a string", v)


def _typed_list(v: Any, where: str, item: str) -> list:
    if not isinstance(v, list):
        raise _bad(where, f"a list of {item}", v)
    return v


def _unit_indices(v: Any, where: str, width: int) -> list[int]:
    for j, i in enumerate(_typed_list(v, where, "unit indices")):
        if not _is_int(i) or not 0 <= i < width:
            raise _bad(f"{where}[{j}]", f"a unit index in [0, {width})", i)
    return v


def _check_partition(
    name: str, width_before: int, width_after: int, kept: list, removed: list, collapsed: bool
) -> None:
    """``removed`` holds no index twice and leaves ``width_after`` units (0 for a collapsed
    group, which keeps one dead placeholder)."""
    dupes = sorted({i for i in removed if removed.count(i) > 1})
    if dupes:
        raise ReportError(
            f"prune report group {name!r} lists removed unit(s) {dupes[:5]} more than once; "
            f"each index may appear once"
        )
    left = width_before - len(removed)
    expect = 0 if collapsed else left
    if width_after != expect or (collapsed and left != 1):
        raise ReportError(
            f"prune report group {name!r}: width_before {width_before} minus "
            f"{len(removed)} removed unit(s) leaves {left}, but width_after is {width_after}"
            + (
                " (a collapsed group keeps 1 placeholder and has width_after 0)"
                if collapsed
                else ""
            )
        )
    if set(kept) & set(removed):
        both = sorted(set(kept) & set(removed))[:5]
        raise ReportError(f"prune report group {name!r} lists unit(s) {both} as kept and removed")


_GROUP_FLOAT_LISTS = ("scores", "deltas", "relative_deltas", "pvalues")


def _check_group(g: Any, where: str) -> None:
    if not isinstance(g, dict):
        raise _bad(where, "an object (one unit group)", g)
    for key in ("name", "kind", "producers", "width_before", "width_after", "kept", "removed"):
        if key not in g:
            raise ReportError(f"prune report field {where!r} has no {key!r}")
    _str(g["name"], f"{where}.name")
    where = f"groups[{g['name']!r}]" if where.endswith("[?]") else where
    _str(g["kind"], f"{where}.kind")
    for j, p in enumerate(_typed_list(g["producers"], f"{where}.producers", "layer names")):
        _str(p, f"{where}.producers[{j}]")
    width = _int(g, "width_before", f"{where}.", low=1)
    after = _int(g, "width_after", f"{where}.")
    if after > width:
        raise _bad(f"{where}.width_after", f"an integer in [0, width_before={width}]", after)
    kept = _unit_indices(g["kept"], f"{where}.kept", width)
    removed = _unit_indices(g["removed"], f"{where}.removed", width)
    collapsed = g.get("collapsed", False)
    if not isinstance(collapsed, bool):
        raise _bad(f"{where}.collapsed", "true or false", collapsed)
    _check_partition(g["name"], width, after, kept, removed, collapsed)
    if "order" in g:
        _unit_indices(g["order"], f"{where}.order", width)
    for key in _GROUP_FLOAT_LISTS:
        for j, v in enumerate(_typed_list(g.get(key, []), f"{where}.{key}", "numbers or nulls")):
            _num_or_null(v, f"{where}.{key}[{j}]")
    for key in ("info_full", "info_kept"):
        _num_or_null(g.get(key), f"{where}.{key}")
    for key, low in (("features_per_unit", 1), ("target_columns", 0)):
        if key in g:
            _int(g, key, f"{where}.", low=low)


#: required report fields and the check of each (``groups`` is checked group by group)
_COUNTS = (
    "units_before",
    "units_after",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
)


def check_report_dict(d: Any) -> None:
    """Check a prune report's dict (:meth:`PruneReport.to_dict`, e.g. read from
    ``report.json``) against the schema: a JSON object with ``format``
    ``"mipp-prune-report"``, ``version`` 1, every required field with its type, counts >= 0,
    shares in [0, 1], and per group unit indices in range, none removed twice, and widths
    that add up. Raises :class:`ReportError` naming the first bad field.

    >>> check_report_dict([1, 2])
    Traceback (most recent call last):
    ...
    mipp.report.ReportError: a prune report is a JSON object, got list [1, 2]
    """
    if not isinstance(d, dict):
        raise ReportError(f"a prune report is a JSON object, got {_kind(d)}")
    if d.get("format") != FORMAT:
        raise ReportError(
            f"not a mipp prune report (format {_show(d.get('format'))}; expected {FORMAT!r})"
        )
    if d.get("version") != VERSION:
        raise ReportError(
            f"prune report version {_show(d.get('version'))}; this mipp reads version {VERSION}"
        )
    required = ("method", "options", "input_shape", "groups", *_COUNTS)
    missing = [k for k in required if k not in d]
    if missing:
        raise ReportError(
            f"prune report has no {missing[0]!r} field (required: {', '.join(required)})"
        )
    _str(d["method"], "method")
    if not isinstance(d["options"], dict):
        raise _bad("options", "an object", d["options"])
    shape = d["input_shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s >= 1 for s in shape):
        raise _bad("input_shape", "a non-empty list of integers >= 1", shape)
    for key in _COUNTS:
        _int(d, key, "")
    if d["units_after"] > d["units_before"]:
        raise _bad("units_after", f"at most units_before ({d['units_before']})", d["units_after"])
    groups = d["groups"]
    if not isinstance(groups, list) or not groups:
        raise _bad("groups", "a non-empty list of unit groups", groups)
    names: set[str] = set()
    for j, g in enumerate(groups):
        _check_group(g, f"groups[{j}]")
        if g["name"] in names:
            raise ReportError(f"prune report lists group {g['name']!r} twice")
        names.add(g["name"])
    _num_or_null(d.get("requested"), "requested", low=0.0, high=1.0)
    _str(d.get("target", "units"), "target")
    achieved = d.get("achieved", {})
    if not isinstance(achieved, dict):
        raise _bad("achieved", "an object of shares in [0, 1]", achieved)
    for key, v in achieved.items():
        if not _is_num(v) or not 0 <= v <= 1:
            raise _bad(f"achieved.{key}", "a number in [0, 1]", v)
    _num_or_null(d.get("threshold"), "threshold")
    timings = d.get("timings", {})
    if not isinstance(timings, dict):
        raise _bad("timings", "an object of seconds", timings)
    for key, v in timings.items():
        _num_or_null(v, f"timings.{key}", low=0.0)
    for key in ("bisection", "compensation"):
        for j, v in enumerate(_typed_list(d.get(key, []), key, "objects")):
            if not isinstance(v, dict):
                raise _bad(f"{key}[{j}]", "an object", v)
    for key in ("collapsed", "notes"):
        for j, v in enumerate(_typed_list(d.get(key, []), key, "strings")):
            _str(v, f"{key}[{j}]")
    unknown = set(d.get("collapsed", [])) - names
    if unknown:
        raise ReportError(
            f"prune report field 'collapsed' names unknown group(s) {sorted(unknown)}"
        )


def check_replay_record(record: Any, *, where: str = "replay record") -> dict[str, Any]:
    """Check a replay record (:meth:`PruneReport.replay_record`, a checkpoint sidecar's
    ``pruning`` entry): ``input_shape`` a list of integers >= 1, ``widths`` group → width
    >= 1, ``removed`` group → unit indices in range, none twice, at least one unit left, for
    exactly the groups of ``widths``. Returns ``record``; raises :class:`ReportError` naming
    ``where`` and the field."""

    def bad(field: str, want: str, value: Any) -> ReportError:
        return ReportError(f"{where} field {field!r} must be {want}, got {_kind(value)}")

    if not isinstance(record, Mapping):
        raise ReportError(
            f"{where} must be an object with input_shape, widths and removed, got {_kind(record)}"
        )
    for key in ("input_shape", "widths", "removed"):
        if key not in record:
            raise ReportError(f"{where} has no {key!r} field (needs input_shape, widths, removed)")
    shape = record["input_shape"]
    if (
        not isinstance(shape, list | tuple)
        or not shape
        or not all(_is_int(s) and s >= 1 for s in shape)
    ):
        raise bad("input_shape", "a non-empty list of integers >= 1", shape)
    widths, removed = record["widths"], record["removed"]
    if not isinstance(widths, Mapping):
        raise bad("widths", "an object of group name -> units", widths)
    if not isinstance(removed, Mapping):
        raise bad("removed", "an object of group name -> removed unit indices", removed)
    for name, w in widths.items():
        if not _is_int(w) or w < 1:
            raise bad(f"widths.{name}", "an integer >= 1", w)
    for name, idx in removed.items():
        if name not in widths:
            raise ReportError(f"{where}: group {name!r} is in 'removed' but not in 'widths'")
        w = widths[name]
        if not isinstance(idx, list | tuple) or not all(_is_int(i) and 0 <= i < w for i in idx):
            raise bad(f"removed.{name}", f"a list of unit indices in [0, {w})", idx)
        if len(set(idx)) != len(idx):
            dupes = sorted({i for i in idx if list(idx).count(i) > 1})
            raise ReportError(
                f"{where}: group {name!r} lists removed unit(s) {dupes[:5]} more than once; "
                f"each index may appear once"
            )
        if len(idx) >= w:
            raise ReportError(
                f"{where}: group {name!r} removes {len(idx)} of its {w} units; at least one "
                f"must stay"
            )
    return dict(record)
