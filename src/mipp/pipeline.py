"""The one pruning pipeline, the same for every method.

:func:`prune` draws the calibration set, copies the model, finds its unit groups, asks the
method to decide (:meth:`~mipp.methods.base.Method.decide`), keeps a dead placeholder unit in
any group the decision empties (layer collapse), removes the units physically, runs the
optional repairs and writes the :class:`~mipp.report.PruneReport`. MIPP and every baseline
go through exactly these steps; they differ only in the decision.

How much to prune: ``sparsity=`` (a share of units, parameters or MACs: ``target=``),
``match=`` another run's report (its achieved share, for equal-sparsity comparisons), or —
for MIPP only — neither, letting its confidence test (or fixed threshold) decide.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.methods import METHODS, TARGETS, Budget, Decision, Method, PruneContext, Target
from mipp.metrics import count_macs, count_params
from mipp.modules import first_parameter, restore_modes, training_modes
from mipp.progress import ProgressCallback, Reporter
from mipp.registry import lookup
from mipp.report import GroupReport, PruneReport
from mipp.surgery.calibration import calibration_inputs
from mipp.surgery.costs import CostModel, measure_layer_latency
from mipp.surgery.repair import finish
from mipp.surgery.structure import SCOPES, Scope, build_structure
from mipp.zoo.data import ImageDataset

__all__ = ["PruneResult", "matched_sparsity", "prune"]


@dataclass
class PruneResult:
    """The physically pruned copy of the model and the record of what was done."""

    model: nn.Module
    report: PruneReport


def _check(
    sparsity,
    target,
    scope,
    calib_samples,
    tolerance,
    batch_size,
    compensate,
    recalibrate_bn,
    latency_batch=64,
) -> None:
    if sparsity is not None and not (
        isinstance(sparsity, int | float) and not isinstance(sparsity, bool) and 0 <= sparsity < 1
    ):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(calib_samples, bool) or not (
        isinstance(calib_samples, int) and calib_samples >= 1
    ):
        raise ValueError(f"calib_samples must be an integer >= 1, got {calib_samples!r}")
    if not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(latency_batch, bool) or not (
        isinstance(latency_batch, int) and latency_batch >= 1
    ):
        raise ValueError(f"latency_batch must be an integer >= 1, got {latency_batch!r}")
    for label, flag in (("compensate", compensate), ("recalibrate_bn", recalibrate_bn)):
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(
                f"{label} must be True, False or None (the method's default), got {flag!r}"
            )


def matched_sparsity(match: PruneReport, target: str, scope: str) -> float:
    """The achieved ``target`` sparsity of ``match``, checked to count the same units."""
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


def _method(method: str | Method) -> Method:
    if isinstance(method, str):
        return lookup(METHODS, method, kind="method")()
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be a name ({', '.join(METHODS)}) or a mipp.methods.Method, "
            f"got {type(method).__name__}"
        )
    return method


def prune(
    model: nn.Module,
    data: ImageDataset | Tensor | tuple[Tensor, Tensor] | Iterable[Any],
    *,
    method: str | Method = "mipp",
    sparsity: float | None = None,
    match: PruneReport | None = None,
    target: Target = "units",
    calib_samples: int = 2048,
    scope: Scope = "internal",
    tolerance: float = 0.01,
    compensate: bool | None = None,
    recalibrate_bn: bool | None = None,
    batch_size: int = 256,
    seed: int = 0,
    latency_batch: int = 64,
    progress: ProgressCallback | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` with MIPP or a baseline; the input model is never modified.

    Args:
        model: a trained (PaT) or freshly initialised (PaI) network (see
            :func:`mipp.surgery.structure.build_structure` for what it may contain).
        data: calibration source — an :class:`~mipp.zoo.data.ImageDataset` or a pair
            ``(inputs, labels)`` (a seeded subset of ``calib_samples`` is drawn), a tensor
            of inputs, or an iterable of batches. Methods that use the loss (SNIP, GraSP,
            SOSP-H, IMP's re-training) need labels.
        method: a registered name (``"mipp"``, the default, or a baseline: see
            :data:`mipp.methods.METHOD_NAMES`) with its default options, or a configured
            method object — ``MIPP(estimator="gaussian")``, ``make_method("l1",
            allocation="global")``, ``IMP(retrain=my_callback)``. Method-specific options
            (MIPP's estimator, pool, order, min_keep, confidence / threshold; a baseline's
            allocation, rounds, ...) live on the object.
        sparsity: share of ``target`` to remove, in [0, 1). MIPP bisects a global threshold
            on the relative conditional MI until the achieved share is within
            ``tolerance``; baselines allocate their scores to reach it. Without it (and
            without ``match``) MIPP applies its own rule: ``MIPP(confidence=...)`` or
            ``MIPP(threshold=...)``, by default the paper's test at confidence 0.95.
        match: a :class:`~mipp.report.PruneReport` whose *achieved* ``target`` sparsity this
            run requests (equal-sparsity comparisons; also gives ``allocation="widths"`` its
            per-layer widths); replaces ``sparsity``.
        target: what ``sparsity`` counts: ``"units"`` (the paper's PR), ``"params"``,
            ``"macs"`` or ``"latency"``: the forward time predicted from a per-layer table
            measured on the calibration inputs at ``latency_batch`` on the model's device
            (:func:`mipp.surgery.costs.measure_layer_latency`; each layer's time scaled by
            its kept widths — a model of the time: measure the result too).
        calib_samples: calibration set size (shared by every method).
        scope: ``"internal"`` prunes single-producer groups (block-internal in residual
            nets, every layer in plain ones); ``"all"`` also prunes residual streams.
        tolerance: allowed |achieved − requested| sparsity.
        compensate: after removal, re-fit every consumer of removed units by ridge least
            squares so its pre-activation outputs on the calibration data match the unpruned
            network's (:func:`mipp.surgery.repair.compensate`; any method). ``None`` (the
            default) takes the method's own choice (:meth:`Method.default_repairs`): on for
            MIPP, whose criterion keeps the units the next layer can be rebuilt from (its
            reconstruction; ``MIPP(reconstruct=False)`` turns it off), off for baselines.
        recalibrate_bn: after removal (and compensation), re-estimate BatchNorm running
            statistics on the calibration data (:func:`mipp.surgery.repair.recalibrate_bn`).
            ``None``: the method's choice, as for ``compensate``.
        batch_size: calibration samples per forward pass.
        seed: calibration subset, random orders and scores, the stochastic estimators.
        latency_batch: batch size of the latency table (``target="latency"``), e.g. 1 for
            single-sample serving, 64 for throughput.
        progress: a callable receiving :class:`~mipp.progress.ProgressEvent` objects (phases,
            bisection steps, rounds, per-layer results); everything is also logged (logger
            ``mipp.pipeline`` and the modules doing the work).

    Returns:
        :class:`PruneResult` with the pruned copy (each submodule in the train/eval mode
        it had in ``model``) and its :class:`~mipp.report.PruneReport`.

    >>> import mipp, torch
    >>> from mipp import seeded
    >>> with seeded(0):
    ...     net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    >>> x = torch.randn(512, 1, 28, 28)
    >>> result = prune(net, x, sparsity=0.5)
    >>> abs(result.report.achieved["units"] - 0.5) <= 0.01
    True
    >>> l1 = prune(net, x, method="l1", match=result.report)
    >>> abs(l1.report.achieved["units"] - result.report.achieved["units"]) <= 0.01
    True
    """
    t0 = time.perf_counter()
    report = Reporter(progress, __name__)
    _check(
        sparsity,
        target,
        scope,
        calib_samples,
        tolerance,
        batch_size,
        compensate,
        recalibrate_bn,
        latency_batch,
    )
    m = _method(method)
    own_compensate, own_recalibrate = m.default_repairs()
    compensate = own_compensate if compensate is None else compensate
    recalibrate_bn = own_recalibrate if recalibrate_bn is None else recalibrate_bn
    widths = None
    if match is not None:
        if sparsity is not None:
            raise ValueError("give either sparsity= or match=, not both")
        sparsity = matched_sparsity(match, target, scope)
        widths = {g.name: g.width_after for g in match.groups}
    budget = Budget(sparsity=sparsity, target=target, tolerance=tolerance, widths=widths)
    m.check(budget)

    # calibrate → copy → structure
    x, y = calibration_inputs(data, calib_samples, seed=seed)
    modes = training_modes(model)
    work = copy.deepcopy(model).eval()
    param = first_parameter(work)
    x = x.to(device=param.device, dtype=param.dtype)
    y = None if y is None else y.to(param.device)
    structure = build_structure(work, x[:2])
    table = None
    if target == "latency":
        report("latency", f"measuring per-layer latency at batch {latency_batch}", transient=True)
        table = measure_layer_latency(work, x, batch_size=latency_batch)
    groups = structure.in_scope(scope)
    if not groups:
        raise MippError(f"{type(model).__name__} has no prunable unit groups in scope {scope!r}")
    ctx = PruneContext(
        model=work,
        structure=structure,
        groups=groups,
        costs=CostModel(structure, x[:2], latency=table),
        inputs=x,
        labels=y,
        batch_size=batch_size,
        seed=seed,
        data=data,
        report=report,
    )
    if m.needs_labels:
        ctx.require_labels(m.name)
    timings = ctx.timings
    timings["structure"] = time.perf_counter() - t0

    # decide
    decision = m.decide(ctx, budget)
    _check_decision(decision, groups, m.name)

    # collapse placeholders → remove
    t = time.perf_counter()
    collapsed = [g.name for g in groups if bool(decision.removed[g.name].all())]
    physical: dict[str, list[int]] = {}
    for g in groups:
        gone = decision.removed[g.name].clone()
        if g.name in collapsed:
            gone[decision.placeholder(g.name)] = False
        physical[g.name] = gone.nonzero().flatten().tolist()
    structure.remove(physical)
    timings["removal"] = time.perf_counter() - t

    # repair
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
        progress=progress,
    )
    timings.update(repair_times)
    timings["total"] = time.perf_counter() - t0

    result = PruneReport(
        method=m.name,
        options={
            **decision.options,
            "calib_samples": len(x),
            "scope": scope,
            "seed": seed,
            "sparsity": sparsity,
            "compensate": compensate,
            "recalibrate_bn": recalibrate_bn,
            **({"latency_batch": latency_batch} if table is not None else {}),
        },
        input_shape=list(x.shape[1:]),
        groups=[_group_report(g, decision, physical, collapsed) for g in groups],
        units_before=ctx.units_total,
        units_after=sum(int((~decision.removed[g.name]).sum()) for g in groups),
        params_before=ctx.costs.params_before,
        params_after=count_params(work),
        macs_before=ctx.costs.macs_before,
        macs_after=count_macs(work, x[:1]).macs,
        requested=sparsity,
        target=target,
        achieved=dict(decision.achieved),
        threshold=decision.threshold,
        bisection=list(decision.trace),
        timings=timings,
        collapsed=collapsed,
        compensation=fits,
        notes=list(decision.notes),
    )
    if collapsed:
        result.notes.append(
            f"layer collapse: every unit of {', '.join(collapsed)} was removed; the network "
            f"keeps a dead placeholder unit there and its output carries no information"
        )
    narrow = [
        f"{r.name} ({r.width_before} → 1)"
        for r in result.groups
        if r.width_after == 1 and r.width_before > 1 and not r.collapsed
    ]
    if narrow:
        result.notes.append(
            f"one-unit bottleneck: {', '.join(narrow)} kept a single unit; everything the "
            f"layers after it see passes through one number per position, which can leave a "
            f"classifier near chance even after re-training"
        )
    restore_modes(work, modes)
    report(
        "done",
        f"{m.name}: {result.units_before} → {result.units_after} units, "
        f"{target} sparsity {result.achieved.get(target, math.nan):.4f} "
        f"in {timings['total']:.2f} s",
        **result.achieved,
    )
    return PruneResult(model=work, report=result)


def _check_decision(decision: Decision, groups: list, method: str) -> None:
    """A method's decision names every group with a bool mask of the group's size."""
    for g in groups:
        mask = decision.removed.get(g.name)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (g.size,):
            raise MippError(
                f"method {method!r} decided no bool mask of {g.size} units for group {g.name!r}"
            )


def _group_report(
    g, decision: Decision, physical: Mapping[str, list[int]], collapsed: list[str]
) -> GroupReport:
    gone = set(physical[g.name])
    kept = [j for j in range(g.size) if j not in gone]
    return GroupReport(
        name=g.name,
        kind=g.kind,
        producers=list(g.producers),
        width_before=g.size,
        width_after=0 if g.name in collapsed else len(kept),
        kept=kept,
        removed=sorted(gone),
        collapsed=g.name in collapsed,
        **decision.groups.get(g.name, {}),
    )
