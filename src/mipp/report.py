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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mipp._io import atomic_write_bytes
from mipp.errors import MippError

__all__ = ["WORK_PHASES", "GroupReport", "PruneReport"]

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
        if d.get("format") != FORMAT:
            raise MippError(f"not a mipp prune report (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise MippError(
                f"prune report version {d.get('version')!r}; this mipp reads version {VERSION}"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["groups"] = [GroupReport.from_dict(g) for g in d["groups"]]
        return cls(**kwargs)

    def replay_record(self) -> dict[str, Any]:
        """The minimal record :func:`~mipp.surgery.replay.apply_report` needs (stored in
        checkpoint sidecars)."""
        return {
            "input_shape": list(self.input_shape),
            "widths": {g.name: g.width_before for g in self.groups if g.removed},
            "removed": self.removed,
        }

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
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise MippError(f"cannot read prune report {path}: {e}") from None
