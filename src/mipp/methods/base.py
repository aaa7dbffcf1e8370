"""The contract every pruning method follows, MIPP included.

:func:`mipp.prune` runs one pipeline for every method: calibrate → copy → structure →
``method.decide(context, budget)`` → collapse placeholders → remove → repair → report. A
method sees a :class:`PruneContext` (the working copy of the model, its unit groups, the cost
model, the shared calibration inputs and labels) and a :class:`Budget` (how much to remove),
and returns a :class:`Decision`: which units of each group go, the sparsity that achieves,
and what it wants recorded in the report. It may change the working copy's *weights* (ThiNet
re-fits its consumers, IMP re-trains between rounds) but never its shapes: removal is the
pipeline's job, so every method is removed, repaired and reported the same way.

Methods are options in ``__init__`` (checked there, so a bad value fails before any data is
run) and work in :meth:`Method.decide`; they are registered by name in
:mod:`mipp.methods` and built from names only there (``make_method``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.inputs import Samples, as_samples
from mipp.progress import Reporter
from mipp.surgery.costs import CostModel
from mipp.surgery.structure import ModelStructure, UnitGroup

__all__ = ["TARGETS", "Budget", "Decision", "Method", "PruneContext", "Target", "sparsities"]

Target = Literal["units", "params", "macs", "latency"]
#: what a sparsity can count: units removed (the paper's "PR"), parameters, MACs, or the
#: forward latency predicted from a measured per-layer table (:mod:`mipp.surgery.costs`)
TARGETS: tuple[str, ...] = ("units", "params", "macs", "latency")


@dataclass(frozen=True)
class Budget:
    """How much to remove.

    Attributes:
        sparsity: share of ``target`` to remove, in [0, 1); None lets the method's own
            stopping rule decide (MIPP's confidence test or fixed threshold). Baselines need it.
        target: what ``sparsity`` counts: ``"units"``, ``"params"`` or ``"macs"``.
        tolerance: allowed |achieved − requested| (a share).
        widths: per-group kept widths of a matched report (``match=``), for methods that
            can keep exactly those widths (``allocation="widths"``); None without ``match``.
    """

    sparsity: float | None
    target: Target = "units"
    tolerance: float = 0.01
    widths: Mapping[str, int] | None = None

    def shortfall(self, achieved: Mapping[str, float], closest: str) -> str | None:
        """The report note when ``achieved`` misses the request by more than the tolerance
        (``closest`` says what the method settled for), else None."""
        if self.sparsity is None or abs(achieved[self.target] - self.sparsity) <= self.tolerance:
            return None
        return (
            f"requested {self.target} sparsity {self.sparsity:.4f} could not be met within "
            f"{self.tolerance}; achieved {achieved[self.target]:.4f} ({closest})"
        )


def sparsities(
    costs: CostModel, groups: list[UnitGroup], removed: Mapping[str, Tensor]
) -> dict[str, float]:
    """Shares of units, params, MACs (and predicted latency, when ``costs`` has a latency
    table) that removing ``removed[group]`` (bool masks) takes away."""
    params, macs = costs(removed)
    gone = sum(int(removed[g.name].sum()) for g in groups if g.name in removed)
    out = {
        "units": gone / sum(g.size for g in groups),
        "params": 1 - params / costs.params_before,
        "macs": 1 - macs / costs.macs_before,
    }
    if costs.latency_before:
        out["latency"] = 1 - costs.latency(removed) / costs.latency_before
    return out


@dataclass
class PruneContext:
    """What a method may look at and use while it decides.

    ``model`` is the working copy (eval mode; the caller's model is never touched). Methods
    that prune in rounds *mask* removed units in it (:meth:`ModelStructure.mask`) and track
    them in ``alive``. ``inputs`` (:class:`~mipp.inputs.Samples`: n samples of a tensor, a
    tuple or a dict of tensors, and the ``forward`` that runs them — ``inputs[i:j].run(model)``
    gives the output; a tensor given here is wrapped) and ``labels`` ``(n,)`` (or None) are
    the calibration set every method shares, on the model's device; ``data`` is what the
    caller passed to :func:`mipp.prune` (IMP re-trains on it). Methods add the seconds of
    their phases to ``timings`` (see :data:`mipp.report.WORK_PHASES` for the names that
    count as their own work) and report progress through ``report``.
    """

    model: nn.Module
    structure: ModelStructure
    groups: list[UnitGroup]
    costs: CostModel
    inputs: Samples
    labels: Tensor | None
    batch_size: int
    seed: int
    data: Any = None
    report: Reporter = field(default_factory=lambda: Reporter(None, "mipp.methods"))
    timings: dict[str, float] = field(default_factory=dict)
    #: group name → bool mask of the units still in play (methods that prune in rounds)
    alive: dict[str, Tensor] = field(default_factory=dict)
    #: per-method scratch space kept across rounds (e.g. ThiNet's sampled contributions)
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = as_samples(self.inputs)
        if not self.alive:
            self.alive = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}

    @property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    @property
    def units_total(self) -> int:
        return sum(g.size for g in self.groups)

    def measure(self, removed: Mapping[str, Tensor]) -> dict[str, float]:
        """Sparsity of units, params and MACs if the units marked in ``removed[group]``
        (bool masks) went; a fully removed group counts as fully removed (layer collapse)."""
        return sparsities(self.costs, self.groups, removed)

    def batches(self, n: int | None = None) -> Iterator[tuple[Samples, Tensor | None]]:
        """The first ``n`` (default all) calibration samples in ``batch_size`` chunks."""
        stop = len(self.inputs) if n is None else min(n, len(self.inputs))
        for i in range(0, stop, self.batch_size):
            j = min(i + self.batch_size, stop)
            y = None if self.labels is None else self.labels[i:j]
            yield self.inputs[i:j], y

    def require_labels(self, method: str) -> Tensor:
        if self.labels is None:
            raise MippError(
                f"method {method!r} needs labels: pass an ImageDataset, a pair (inputs, labels) "
                f"or batches of (inputs, labels) as data"
            )
        return self.labels


@dataclass
class Decision:
    """What a method decided.

    Attributes:
        removed: group name → bool mask ``(size,)`` of the units to remove, for every group
            of the context. A fully removed group is a layer collapse: the pipeline keeps
            one dead placeholder unit (the highest-scoring one) and records the collapse.
        achieved: sparsity of units, params and MACs of that removal (collapses counted as
            fully removed), as :meth:`PruneContext.measure` gives it.
        groups: group name → extra :class:`~mipp.report.GroupReport` fields (``scores`` —
            higher = keep —, MIPP's ``deltas``, ``order``, ``info_kept`` ...).
        options: the method's options as the report records them (resolved values).
        trace: the search behind the decision (MIPP's bisection, a scored method's rounds).
        threshold: the threshold the decision used (MIPP), else None.
        notes: lines for the report (e.g. a sparsity that could not be met).
    """

    removed: dict[str, Tensor]
    achieved: dict[str, float]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, float]] = field(default_factory=list)
    threshold: float | None = None
    notes: list[str] = field(default_factory=list)

    def placeholder(self, group: str) -> int:
        """The unit kept physically when every unit of ``group`` was removed: the one with
        the highest score (NaN scores last), or unit 0 without scores."""
        scores = self.groups.get(group, {}).get("scores")
        if scores is None or len(scores) == 0:
            return 0
        s = torch.as_tensor(scores, dtype=torch.float64)
        return int(torch.argmax(torch.nan_to_num(s, nan=-math.inf)))


class Method(ABC):
    """Base of every pruning method (see the module docstring).

    Class attributes: ``name`` (the registry name), ``summary`` (one line for ``mipp list
    methods``), ``needs_labels`` (the pipeline refuses unlabelled data up front) and
    ``needs_budget`` (whether a sparsity is required, or the method has its own rule).
    """

    name: ClassVar[str] = "method"
    summary: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    needs_budget: ClassVar[bool] = True

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The method's options (as given to ``__init__``; JSON-friendly values)."""

    def check(self, budget: Budget) -> None:
        """Refuse a budget the method cannot work with (before any data is run)."""
        if self.needs_budget and budget.sparsity is None:
            raise ValueError(
                f"method {self.name!r} needs sparsity= (or match=) to know how much to prune"
            )

    @abstractmethod
    def decide(self, ctx: PruneContext, budget: Budget) -> Decision:
        """Choose the units to remove (see :class:`Decision`)."""

    def default_repairs(self) -> tuple[bool, bool]:
        """``(compensate, recalibrate_bn)`` when :func:`mipp.prune` is not told: the one-shot
        repairs that belong to the method. None for a baseline (its paper prunes without
        them; every study offers them to it as a variant); MIPP's reconstruction."""
        return False, False

    def extra_training_epochs(self) -> int:
        """Training epochs the method spends inside :meth:`decide` that other methods do not
        get (IMP's re-training between rounds); 0 for a method that only scores."""
        return 0

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
