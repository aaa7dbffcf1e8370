"""The loop every baseline runs: score → allocate → mask, for each round; then remove.

Rounds follow SynFlow's exponential schedule: after round r of R the requested sparsity is
``1 − (1 − s)^(r/R)`` (of units, params or MACs, whatever ``target`` counts), so one round
is one-shot pruning. Between rounds the removed units are *masked* in the working copy
(:meth:`~mipp.structure.ModelStructure.mask`) and the method re-scores what is left; after
the last round they are removed physically through the same backend MIPP uses.

Layer collapse is recorded, not hidden. When the allocation removes every unit of a group,
a layer cannot have zero width, so one unit stays physically as a dead placeholder: its
weights in and out (and BatchNorm scale and shift) are zero, so the layer's output carries
no information and stays dead under fine-tuning. The group's report has ``collapsed=True``
and ``width_after=0``; the report lists it in ``collapsed``; unit / param / MAC sparsity
count the group as fully removed, while ``params_after`` / ``macs_after`` measure the
physical model (placeholder included).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from mipp.baselines.allocation import allocate
from mipp.baselines.base import ALLOCATIONS, Method, ScoringContext
from mipp.calibration import calibration_inputs
from mipp.compensation import finish
from mipp.costs import CostModel
from mipp.errors import MippError
from mipp.metrics import count_macs, count_params
from mipp.report import GroupReport, PruneReport
from mipp.structure import ModelStructure, UnitGroup, build_structure

__all__ = ["matched_sparsity", "prune_with_method", "run_method"]


def measure_for(groups: list[UnitGroup], costs: CostModel):
    """``removed masks → {units, params, macs}`` sparsity (collapsed groups fully removed)."""
    total = sum(g.size for g in groups)

    def measure(removed: list[Tensor]) -> dict[str, float]:
        params, macs = costs({g.name: r for g, r in zip(groups, removed, strict=True)})
        return {
            "units": sum(int(r.sum()) for r in removed) / total,
            "params": 1 - params / costs.params_before,
            "macs": 1 - macs / costs.macs_before,
        }

    return measure


def prepare(model: nn.Module, x: Tensor, scope: str):
    """Working copy in eval mode, its structure, in-scope groups and cost model."""
    work = copy.deepcopy(model).eval()
    structure = build_structure(work, x[:2])
    groups = structure.in_scope(scope)
    if not groups:
        raise MippError(f"{type(model).__name__} has no prunable unit groups in scope {scope!r}")
    return work, structure, groups, CostModel(structure, x[:2])


def run_method(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    method: Method,
    *,
    data: Any,
    sparsity: float,
    target: str,
    allocation: str,
    scope: str,
    batch_size: int,
    seed: int,
    tolerance: float,
    console: Console,
    compensate: bool = False,
    recalibrate_bn: bool = False,
    widths: dict[str, int] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of ``model`` with ``method``; returns (pruned copy, report).

    ``widths`` (allocation ``"widths"``): units each group keeps, by group name.

    ``compensate`` / ``recalibrate_bn``: the one-shot repairs of :func:`mipp.compensation.finish`
    after removal (collapsed groups stay dead).
    """
    t0 = time.perf_counter()
    timings = {"scoring": 0.0, "allocation": 0.0}
    work, structure, groups, costs = prepare(model, x, scope)
    measure = measure_for(groups, costs)
    names = [g.name for g in groups]
    alive = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
    keep = None
    if allocation == "widths":
        keep = _widths_for(groups, widths, method)
    ctx = ScoringContext(
        model=work,
        structure=structure,
        groups=groups,
        inputs=x,
        labels=y,
        alive=alive,
        batch_size=batch_size,
        seed=seed,
        data=data,
    )
    if method.needs_labels:
        ctx.require_labels(method.name)
    timings["structure"] = time.perf_counter() - t0
    scores: dict[str, Tensor] = {}
    achieved: dict[str, float] = {}
    trace: list[dict[str, float]] = []
    removed = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    for r in range(1, method.rounds + 1):
        goal = 1 - (1 - sparsity) ** (r / method.rounds)
        t = time.perf_counter()
        with console.status(f"{method.name}: scoring units (round {r} of {method.rounds})"):
            scores = method.scores(ctx)
        timings["scoring"] += time.perf_counter() - t
        missing = [n for n in names if n not in scores or scores[n].shape != (alive[n].numel(),)]
        if missing:
            raise MippError(
                f"method {method.name!r} returned no or mis-shaped scores for {missing}"
            )
        t = time.perf_counter()
        removed, achieved = allocate(
            [scores[n].detach().double().cpu() for n in names],
            [alive[n] for n in names],
            names=names,
            method=method.name,
            mode=allocation,
            sparsity=goal,
            target=target,
            measure=measure,
            normalize=method.normalize,
            tolerance=tolerance,
            keep=keep,
        )
        timings["allocation"] += time.perf_counter() - t
        trace.append({"round": r, "goal": goal, **achieved})
        console.log(f"{method.name} round {r}: {target} sparsity {achieved[target]:.4f}")
        structure.mask(
            {n: m.nonzero().flatten().tolist() for n, m in zip(names, removed, strict=True)}
        )
        for n, m in zip(names, removed, strict=True):
            alive[n] = ~m
        if r < method.rounds:
            t = time.perf_counter()
            method.after_round(ctx, r)
            work.eval()
            timings["between_rounds"] = timings.get("between_rounds", 0.0) + time.perf_counter() - t
    decided = dict(zip(names, removed, strict=True))
    method.before_removal(ctx, decided)

    t = time.perf_counter()
    collapsed, placeholders = [], {}
    for g in groups:
        if bool(decided[g.name].all()):
            collapsed.append(g.name)
            s = scores[g.name].double().cpu()
            placeholders[g.name] = int(torch.argmax(torch.nan_to_num(s, nan=-torch.inf)))
    physical = {}
    for g in groups:
        gone = decided[g.name].clone()
        if g.name in placeholders:
            gone[placeholders[g.name]] = False
        physical[g.name] = gone.nonzero().flatten().tolist()
    structure.remove(physical)
    timings["removal"] = time.perf_counter() - t
    fits, repair_times = finish(
        model,
        work,
        structure,
        physical,
        x,
        compensate_layers=compensate,
        recalibrate=recalibrate_bn,
        collapsed=collapsed,
        batch_size=batch_size,
        seed=seed,
        progress=not console.quiet,
    )
    timings.update(repair_times)
    timings["total"] = time.perf_counter() - t0
    report = _report(
        method,
        structure,
        groups,
        decided,
        physical,
        scores,
        collapsed,
        work,
        costs,
        x,
        sparsity=sparsity,
        target=target,
        allocation=allocation,
        scope=scope,
        seed=seed,
        achieved=achieved,
        trace=trace,
        timings=timings,
    )
    if abs(achieved[target] - sparsity) > tolerance:
        report.notes.append(
            f"requested {target} sparsity {sparsity:.4f} could not be met within {tolerance}; "
            f"achieved {achieved[target]:.4f} (the closest the allocation allows)"
        )
    if collapsed:
        report.notes.append(
            f"layer collapse: every unit of {', '.join(collapsed)} was removed; the network "
            f"keeps a dead placeholder unit there and its output carries no information"
        )
    report.compensation = fits
    report.options["compensate"] = compensate
    report.options["recalibrate_bn"] = recalibrate_bn
    work.train(model.training)
    return work, report


def _widths_for(groups: list[UnitGroup], widths: dict[str, int] | None, method: Method):
    """Per-group kept widths (walk order) for allocation ``"widths"``, checked."""
    if widths is None:
        raise ValueError("allocation 'widths' keeps a matched report's widths: pass match=")
    if method.rounds != 1:
        raise ValueError(
            f"allocation 'widths' is one-shot; {method.name!r} scores over {method.rounds} rounds"
        )
    names = [g.name for g in groups]
    if sorted(widths) != sorted(names):
        raise ValueError(
            f"the matched report's groups {sorted(widths)} differ from this model's {sorted(names)}"
        )
    return [int(widths[n]) for n in names]


def _report(
    method: Method,
    structure: ModelStructure,
    groups: list[UnitGroup],
    decided: dict[str, Tensor],
    physical: dict[str, list[int]],
    scores: dict[str, Tensor],
    collapsed: list[str],
    work: nn.Module,
    costs: CostModel,
    x: Tensor,
    *,
    sparsity: float,
    target: str,
    allocation: str,
    scope: str,
    seed: int,
    achieved: dict[str, float],
    trace: list[dict[str, float]],
    timings: dict[str, float],
) -> PruneReport:
    group_reports = []
    for g in groups:
        gone = set(physical[g.name])
        kept = [j for j in range(g.size) if j not in gone]
        group_reports.append(
            GroupReport(
                name=g.name,
                kind=g.kind,
                producers=list(g.producers),
                width_before=g.size,
                width_after=0 if g.name in collapsed else len(kept),
                kept=kept,
                removed=sorted(gone),
                scores=scores[g.name].double().cpu().tolist(),
                collapsed=g.name in collapsed,
            )
        )
    return PruneReport(
        method=method.name,
        options={
            **method.options(),
            "allocation": allocation,
            "calib_samples": len(x),
            "scope": scope,
            "seed": seed,
            "sparsity": sparsity,
        },
        input_shape=list(x.shape[1:]),
        groups=group_reports,
        units_before=sum(g.size for g in groups),
        units_after=sum(int((~decided[g.name]).sum()) for g in groups),
        params_before=costs.params_before,
        params_after=count_params(work),
        macs_before=costs.macs_before,
        macs_after=count_macs(work, x[:1]).macs,
        requested=sparsity,
        target=target,
        achieved=achieved,
        bisection=trace,
        timings=timings,
        collapsed=collapsed,
    )


def matched_sparsity(match: PruneReport, sparsity, target: str, scope: str) -> float:
    if sparsity is not None:
        raise ValueError("give either sparsity= or match=, not both")
    if not isinstance(match, PruneReport):
        raise TypeError(f"match must be a PruneReport, got {type(match).__name__}")
    if target not in match.achieved:
        raise ValueError(
            f"the report to match has no achieved {target!r} sparsity; it has "
            f"{sorted(match.achieved) or 'none'}"
        )
    their = match.options.get("scope", "internal")
    if their != scope:
        raise ValueError(
            f"the report to match was made with scope={their!r}; run with scope={their!r} so "
            f"both count the same units (got scope={scope!r})"
        )
    return float(match.achieved[target])


def prune_with_method(
    model: nn.Module,
    data: Any,
    *,
    method: str | Method,
    sparsity: float | None,
    mipp_only: dict[str, Any],
    target: str,
    allocation: str | None,
    calib_samples: int,
    scope: str,
    tolerance: float,
    batch_size: int,
    seed: int,
    progress: bool,
    compensate: bool = False,
    recalibrate_bn: bool = False,
    widths: dict[str, int] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """:func:`mipp.prune` for a baseline: resolve and check options, run, return (model, report)."""
    from mipp.baselines import make_method
    from mipp.prune import check_options

    m = make_method(method) if isinstance(method, str) else method
    if not isinstance(m, Method):
        raise TypeError(f"method must be a name or a mipp.baselines.Method, got {m!r}")
    given = sorted(k for k, v in mipp_only.items() if v is not None)
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to method 'mipp' only; baseline {m.name!r} takes "
            f"sparsity= (or match=), target=, allocation= and scope="
        )
    if sparsity is None:
        raise ValueError(f"method {m.name!r} needs sparsity= (or match=) to know how much to prune")
    check_options(sparsity, None, None, target, scope, "mean", calib_samples, 1, tolerance)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    allocation = m.default_allocation if allocation is None else allocation
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    x, y = calibration_inputs(data, calib_samples, seed=seed)
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    y = None if y is None else y.to(param.device)
    console = Console(stderr=True, quiet=not progress)
    work, report = run_method(
        model,
        x,
        y,
        m,
        data=data,
        sparsity=sparsity,
        target=target,
        allocation=allocation,
        scope=scope,
        batch_size=batch_size,
        seed=seed,
        tolerance=tolerance,
        console=console,
        compensate=compensate,
        recalibrate_bn=recalibrate_bn,
        widths=widths,
    )
    return work, report
