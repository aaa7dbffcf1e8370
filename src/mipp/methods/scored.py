"""Methods that score units and let an allocation decide how many go where.

A :class:`ScoredMethod` scores every unit of every in-scope group (higher = keep) from the
:class:`~mipp.methods.base.PruneContext`; how many units go where is decided by
:mod:`mipp.methods.allocation` (``"global"`` ranking, ``"uniform"`` per-layer ratio, or the
``"widths"`` of a matched report), not by the scores' method. :meth:`ScoredMethod.decide`
runs ``rounds`` score → allocate → mask rounds. Rounds follow SynFlow's exponential
schedule: after round r of R the requested sparsity is ``1 − (1 − s)^(r/R)`` (of units,
params or MACs, whatever the budget counts), so one round is one-shot pruning. Between
rounds the removed units are *masked* in the working copy
(:meth:`~mipp.surgery.structure.ModelStructure.mask`) and the method re-scores what is left.

Layer collapse is allowed and recorded, not hidden: when the allocation removes every unit
of a group, the decision says so and the pipeline keeps one dead placeholder unit.

Methods whose paper scores single weights (SNIP, GraSP, SynFlow, SOSP-H) are made
structured by **L1 aggregation**: a unit's score is the sum of the absolute per-weight scores
over the unit's own parameters — the producer's weight rows (a filter, or a neuron's incoming
weights) and its bias entries, summed over every producer of the group. This is how the MIPP
paper made SynFlow and GraSP structured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.methods.allocation import allocate
from mipp.methods.base import Budget, Decision, Method, PruneContext
from mipp.surgery.structure import Consumer, UnitGroup

__all__ = [
    "ALLOCATIONS",
    "NORMALIZE",
    "Allocation",
    "ScoredMethod",
    "unit_maps",
    "unit_sum",
]

Allocation = Literal["global", "uniform", "widths"]
#: ``"widths"`` keeps, in every group, as many units as a matched report's group kept
#: (``match=`` required): the allocation comes from that report, the choice from the method
ALLOCATIONS: tuple[str, ...] = ("global", "uniform", "widths")
Normalize = Literal["mean", "l2", "none"]
NORMALIZE: tuple[str, ...] = ("mean", "l2", "none")


class ScoredMethod(Method):
    """Base of every baseline: options in ``__init__``, :meth:`scores` does the work.

    Subclasses set ``name``, ``default_allocation``, ``needs_labels`` and the default
    ``rounds`` (how many score → prune rounds). Options every scored method takes:

    - ``allocation``: ``"global"``, ``"uniform"`` or ``"widths"`` (None: the method's own
      ``default_allocation``);
    - ``rounds``: score → allocate → mask rounds, >= 1;
    - ``normalize``: ``"mean"`` divides each group's scores by their mean |score| before a
      global ranking, ``"l2"`` by their ℓ2 norm (Molchanov et al. 2017), ``"none"`` ranks
      raw scores;
    - ``cost_aware``: with a params / MACs budget and the global ranking, rank units by
      normalised score per unit of cost, s_i / (c_i / c̄) — the same Lagrangian trade MIPP
      makes (c_i: what removing unit i saves, c̄: the mean over the network's units). Off by
      default: the papers rank scores alone.
    """

    default_allocation: ClassVar[Allocation] = "global"
    #: True for methods whose scores are per-weight scores aggregated by L1 per unit
    l1_aggregated: ClassVar[bool] = False

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        if not isinstance(cost_aware, bool):
            raise ValueError(f"cost_aware must be True or False, got {cost_aware!r}")
        if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if allocation == "widths" and rounds != 1:
            raise ValueError(
                f"allocation 'widths' is one-shot; {self.name!r} was given rounds={rounds}"
            )
        self.allocation: Allocation = allocation or self.default_allocation
        self.rounds = rounds
        self.normalize = normalize
        self.cost_aware = cost_aware

    def options(self) -> dict[str, Any]:
        """The method's options as recorded in the report."""
        return {
            "rounds": self.rounds,
            "normalize": self.normalize,
            "allocation": self.allocation,
            "cost_aware": self.cost_aware,
        }

    def check(self, budget: Budget) -> None:
        super().check(budget)
        if self.allocation == "widths" and budget.widths is None:
            raise ValueError("allocation='widths' keeps the per-layer widths of match=: pass it")

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        """Per-unit scores of every group in ``ctx.groups``: ``{name: (size,)}``, higher = keep."""
        raise NotImplementedError

    def after_round(self, ctx: PruneContext, round: int) -> None:
        """Hook run after round ``round`` (1-based) has masked its units, except after the
        last round (IMP re-trains here; masked units stay exactly zero under training)."""

    def before_removal(self, ctx: PruneContext, removed: Mapping[str, Tensor]) -> None:
        """Hook run on the working model after the final decision, before units are removed
        (ThiNet re-fits its consumers here). ``removed[g]`` is a bool mask per group."""

    def decide(self, ctx: PruneContext, budget: Budget) -> Decision:
        """``rounds`` rounds of score → allocate → mask, then :meth:`before_removal`."""
        assert budget.sparsity is not None  # check() ran
        groups, names = ctx.groups, [g.name for g in ctx.groups]
        keep = _widths_for(groups, budget.widths) if self.allocation == "widths" else None
        timings = ctx.timings
        timings.setdefault("scoring", 0.0)
        timings.setdefault("allocation", 0.0)
        scores: dict[str, Tensor] = {}
        achieved: dict[str, float] = {}
        trace: list[dict[str, float]] = []
        removed = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
        for r in range(1, self.rounds + 1):
            goal = 1 - (1 - budget.sparsity) ** (r / self.rounds)
            t = time.perf_counter()
            ctx.report(
                "scoring",
                f"{self.name}: scoring units (round {r} of {self.rounds})",
                done=r - 1,
                total=self.rounds,
                transient=True,
            )
            scores = self.scores(ctx)
            timings["scoring"] += time.perf_counter() - t
            missing = [
                n for n in names if n not in scores or scores[n].shape != (ctx.alive[n].numel(),)
            ]
            if missing:
                raise MippError(
                    f"method {self.name!r} returned no or mis-shaped scores for {missing}"
                )
            t = time.perf_counter()
            cost = None
            if self.cost_aware and budget.target != "units" and self.allocation == "global":
                cost = _cost_scales(ctx, names, budget.target)
            removed, achieved = allocate(
                [scores[n].detach().double().cpu() for n in names],
                [ctx.alive[n] for n in names],
                names=names,
                method=self.name,
                mode=self.allocation,
                sparsity=goal,
                target=budget.target,
                measure=lambda masks: ctx.measure(dict(zip(names, masks, strict=True))),
                normalize=self.normalize,
                tolerance=budget.tolerance,
                keep=keep,
                cost=cost,
            )
            timings["allocation"] += time.perf_counter() - t
            trace.append({"round": r, "goal": goal, **achieved})
            ctx.report(
                "scoring",
                f"{self.name} round {r}: {budget.target} sparsity {achieved[budget.target]:.4f}",
                done=r,
                total=self.rounds,
                **achieved,
            )
            ctx.structure.mask(
                {n: m.nonzero().flatten().tolist() for n, m in zip(names, removed, strict=True)}
            )
            for n, m in zip(names, removed, strict=True):
                ctx.alive[n] = ~m
            if r < self.rounds:
                t = time.perf_counter()
                self.after_round(ctx, r)
                ctx.model.eval()
                timings["between_rounds"] = (
                    timings.get("between_rounds", 0.0) + time.perf_counter() - t
                )
        decided = dict(zip(names, removed, strict=True))
        self.before_removal(ctx, decided)
        decision = Decision(
            removed=decided,
            achieved=achieved,
            groups={n: {"scores": scores[n].double().cpu().tolist()} for n in names},
            options=self.options(),
            trace=trace,
        )
        note = budget.shortfall(achieved, "the closest the allocation allows")
        if note:
            decision.notes.append(note)
        return decision


def _cost_scales(ctx: PruneContext, names: list[str], kind: str) -> list[Tensor]:
    """c_i / c̄ per unit of every group, given the units already removed (``ctx.alive``)."""
    removed = {n: ~ctx.alive[n] for n in names}
    per = ctx.costs.unit_costs(removed, kind)
    start = ctx.costs.unit_costs({}, kind)
    every = torch.cat([start[n] for n in names if n in start])
    mean = float(every.mean()) if every.numel() else 0.0
    mean = mean if mean > 0 else 1.0
    return [per[n] / mean if n in per else torch.ones(ctx.alive[n].numel()) for n in names]


def _widths_for(groups: list[UnitGroup], widths: Mapping[str, int] | None) -> list[int]:
    """Per-group kept widths (walk order) for allocation ``"widths"``, checked."""
    if widths is None:
        raise ValueError("allocation 'widths' keeps a matched report's widths: pass match=")
    names = [g.name for g in groups]
    if sorted(widths) != sorted(names):
        raise ValueError(
            f"the matched report's groups {sorted(widths)} differ from this model's {sorted(names)}"
        )
    return [int(widths[n]) for n in names]


def unit_sum(group: UnitGroup, modules: Mapping[str, nn.Module], per_param) -> Tensor:
    """Sum a per-parameter score over each unit's own parameters → ``(size,)`` float64.

    ``per_param(param) -> Tensor`` gives a score tensor shaped like ``param`` (or None to
    skip it). The unit's parameters are every producer's weight rows and bias entries for
    that unit (dimension 0 of Conv/Linear weights is the output unit), over all its channels
    (several in a group tied by a grouped conv), and its filters in the depthwise convs it
    passes through.
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    for p in [*group.producers, *group.channelwise]:
        module = modules[p]
        index = group.producer_index.get(p, group.producer_index[group.root])
        owner = torch.tensor([j for j, ix in enumerate(index) for _ in ix], dtype=torch.long)
        idx = torch.tensor([c for ix in index for c in ix], dtype=torch.long)
        for param in (module.weight, module.bias):
            if param is None:
                continue
            s = per_param(param)
            if s is None:
                continue
            per_out = s.detach().reshape(s.shape[0], -1).sum(1).double().cpu()
            total.index_add_(0, owner, per_out[idx])
    return total


def unit_maps(raw: Tensor, consumer: Consumer) -> Tensor:
    """Each unit's activation maps from a consumer's raw input → ``(n, units, h, w)``.

    A conv input ``(n, C, H, W)`` gives each unit its channel; a Linear input ``(n, F)``
    gives each unit its m input values, as a square map when m is a square (a flattened
    conv channel) and as an ``(m, 1)`` column otherwise (m = 1 for a neuron).
    """
    idx = torch.tensor(consumer.index, dtype=torch.long)  # (U, m)
    if raw.ndim == 4:  # several channels per unit (tied by a grouped conv): stacked rows
        n, _, h, w = raw.shape
        return raw[:, idx].reshape(n, idx.shape[0], idx.shape[1] * h, w)
    if raw.ndim == 3:  # Conv1d input (n, C, L)
        n, _, length = raw.shape
        return raw[:, idx].reshape(n, idx.shape[0], idx.shape[1] * length, 1)
    if raw.ndim != 2:
        raise MippError(f"cannot read unit maps from an input of shape {tuple(raw.shape)}")
    g = raw[:, idx]  # (n, U, m)
    n, u, m = g.shape
    side = round(m**0.5)
    if side * side == m:
        return g.reshape(n, u, side, side)
    return g.reshape(n, u, m, 1)
