"""The contract every baseline follows, and what a method gets to score units with.

A baseline is a :class:`Method`: it scores every unit of every in-scope group (higher =
keep) from a :class:`ScoringContext` — the working copy of the model, its unit groups
(:mod:`mipp.structure`), the shared calibration inputs and labels. How many units go where
is decided by :mod:`mipp.baselines.allocation`, not by the method; the loop in
:mod:`mipp.baselines.driver` runs the rounds, removes units and writes the report.

Methods whose paper scores single weights (SNIP, GraSP, SynFlow, SOSP-H) are made
structured by **L1 aggregation**: a unit's score is the sum of the absolute per-weight scores
over the unit's own parameters — the producer's weight rows (a filter, or a neuron's incoming
weights) and its bias entries, summed over every producer of the group. This is how the MIPP
paper made SynFlow and GraSP structured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.structure import Consumer, ModelStructure, UnitGroup

__all__ = [
    "Allocation",
    "Method",
    "ScoringContext",
    "unit_maps",
    "unit_sum",
]

Allocation = Literal["global", "uniform", "widths"]
#: ``"widths"`` keeps, in every group, as many units as a matched report's group kept
#: (``match=`` required): the allocation comes from that report, the choice from the method
ALLOCATIONS = ("global", "uniform", "widths")
Normalize = Literal["mean", "none"]
NORMALIZE = ("mean", "none")


@dataclass
class ScoringContext:
    """What a method may look at when it scores units.

    ``model`` is the working copy (eval mode) with every unit removed so far *masked*
    (weights zeroed, see :meth:`~mipp.structure.ModelStructure.mask`); ``alive[g]`` marks
    the units of group ``g`` still in play. ``inputs`` ``(n, *input_shape)`` and ``labels``
    ``(n,)`` (or None) are the calibration set shared by all methods, on the model's device.
    ``data`` is what the user passed to :func:`mipp.prune` (IMP re-trains on it).
    """

    model: nn.Module
    structure: ModelStructure
    groups: list[UnitGroup]
    inputs: Tensor
    labels: Tensor | None
    alive: dict[str, Tensor]
    batch_size: int
    seed: int
    data: Any = None
    #: per-method scratch space kept across rounds (e.g. ThiNet's sampled contributions)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def batches(self, n: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
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


class Method:
    """Base of every baseline: options in ``__init__``, :meth:`scores` does the work.

    Subclasses set ``name``, ``default_allocation``, ``needs_labels`` and ``rounds`` (how
    many score → prune rounds; the target follows an exponential schedule, as in SynFlow).
    """

    name: ClassVar[str] = "method"
    default_allocation: ClassVar[Allocation] = "global"
    needs_labels: ClassVar[bool] = False
    #: True for methods whose scores are per-weight scores aggregated by L1 per unit
    l1_aggregated: ClassVar[bool] = False

    def __init__(self, *, rounds: int = 1, normalize: Normalize = "mean") -> None:
        if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.rounds = rounds
        self.normalize = normalize

    def options(self) -> dict[str, Any]:
        """The method's options as recorded in the report."""
        return {"rounds": self.rounds, "normalize": self.normalize}

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        """Per-unit scores of every group in ``ctx.groups``: ``{name: (size,)}``, higher = keep."""
        raise NotImplementedError

    def after_round(self, ctx: ScoringContext, round: int) -> None:
        """Hook run after round ``round`` (1-based) has masked its units, except after the
        last round (IMP re-trains here; masked units stay exactly zero under training)."""

    def before_removal(self, ctx: ScoringContext, removed: Mapping[str, Tensor]) -> None:
        """Hook run on the working model after the final decision, before units are removed
        (ThiNet re-fits its consumers here). ``removed[g]`` is a bool mask per group."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def unit_sum(group: UnitGroup, modules: Mapping[str, nn.Module], per_param) -> Tensor:
    """Sum a per-parameter score over each unit's own parameters → ``(size,)`` float64.

    ``per_param(param) -> Tensor`` gives a score tensor shaped like ``param`` (or None to
    skip it). The unit's parameters are every producer's weight rows and bias entries for
    that unit (dimension 0 of Conv/Linear weights is the output unit).
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    for p in group.producers:
        module = modules[p]
        idx = torch.tensor(group.producer_index[p], dtype=torch.long)
        for param in (module.weight, module.bias):
            if param is None:
                continue
            s = per_param(param)
            if s is None:
                continue
            per_out = s.detach().reshape(s.shape[0], -1).sum(1).double().cpu()
            total += per_out[idx]
    return total


def unit_maps(raw: Tensor, consumer: Consumer) -> Tensor:
    """Each unit's activation maps from a consumer's raw input → ``(n, units, h, w)``.

    A conv input ``(n, C, H, W)`` gives each unit its channel; a Linear input ``(n, F)``
    gives each unit its m input values, as a square map when m is a square (a flattened
    conv channel) and as an ``(m, 1)`` column otherwise (m = 1 for a neuron).
    """
    idx = torch.tensor(consumer.index, dtype=torch.long)  # (U, m)
    if raw.ndim == 4:
        if idx.shape[1] != 1:
            raise MippError("a conv consumer maps one channel per unit; got several")
        return raw[:, idx[:, 0]]
    if raw.ndim == 3:  # Conv1d input (n, C, L)
        return raw[:, idx[:, 0]].unsqueeze(-1)
    if raw.ndim != 2:
        raise MippError(f"cannot read unit maps from an input of shape {tuple(raw.shape)}")
    g = raw[:, idx]  # (n, U, m)
    n, u, m = g.shape
    side = round(m**0.5)
    if side * side == m:
        return g.reshape(n, u, side, side)
    return g.reshape(n, u, m, 1)
