"""MIPP on a whole network: capture → select (output → input) → remove → report.

:func:`prune` copies the model, runs a fixed calibration set through it once recording what
every consumer layer reads (:mod:`mipp.capture`), and walks the unit groups from the output
towards the input (:mod:`mipp.structure`). For group l the target is what its consumers
produce — the next layer's activations restricted to the units already kept there (the
logits for the last hidden layer) — and the TERC selection of :mod:`mipp.selection` keeps the
units whose conditional information about that target is significant. The chosen units are
then removed physically. METHOD.md §2 is the specification.

Three ways to say how much to prune (exactly one):

- ``sparsity=`` (target mode): a global sparsity of units, parameters or MACs (``target=``);
  one global threshold on the *relative* Δ_i is bisected until the achieved sparsity is
  within ``tolerance`` of the request. Per-layer ratios come from the method.
- ``confidence=`` (the paper's mode): keep a unit iff we are more than ``confidence`` sure
  that Δ_i > 0.
- ``threshold=``: one pass with a fixed threshold on the relative Δ_i.

Statistics are computed once per group; bisection re-runs only the selection loop. For the
closed-form estimators (``linear``, ``gaussian``) they are float64 second moments accumulated
batch by batch while the calibration data flows through the network, so no activations are
held and memory is O(D²) per group, whatever the calibration size.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from rich.console import Console
from torch import Tensor, nn

from mipp.baselines.base import Allocation, Method
from mipp.baselines.driver import matched_sparsity, prune_with_method
from mipp.bisection import bisect_threshold
from mipp.calibration import calibration_inputs
from mipp.capture import Pool, capture_activations, stream_activations
from mipp.compensation import finish
from mipp.costs import CostModel
from mipp.data import ImageDataset
from mipp.errors import MippError
from mipp.estimators import Estimator, make_estimator
from mipp.features import GroupData, StreamedMoments, group_data, required_samples
from mipp.metrics import count_macs, count_params
from mipp.report import GroupReport, PruneReport
from mipp.selection import SelectionResult, terc
from mipp.structure import SCOPES, Scope, build_structure

__all__ = ["PruneResult", "prune"]

Target = Literal["units", "params", "macs"]
TARGETS = ("units", "params", "macs")


@dataclass
class PruneResult:
    """The physically pruned copy of the model and the record of what was done."""

    model: nn.Module
    report: PruneReport


# ----------------------------------------------------------------------------- inputs


def check_options(
    sparsity, confidence, threshold, target, scope, pool, calib_samples, min_keep, tolerance
) -> None:
    given = [
        k
        for k, v in (("sparsity", sparsity), ("confidence", confidence), ("threshold", threshold))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of sparsity= (target mode), confidence= (the paper's test) or "
            f"threshold= (fixed relative threshold); got {given or 'none'}"
        )
    if sparsity is not None and not (isinstance(sparsity, int | float) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if confidence is not None and not (isinstance(confidence, int | float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if threshold is not None and not (
        isinstance(threshold, int | float) and math.isfinite(threshold) and threshold >= 0
    ):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not (pool == "mean" or (isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1)):
        raise ValueError(f"pool must be 'mean' or a positive integer k (k×k), got {pool!r}")
    if not (isinstance(calib_samples, int) and calib_samples >= 1):
        raise ValueError(f"calib_samples must be an integer >= 1, got {calib_samples!r}")
    if not (isinstance(min_keep, int) and min_keep >= 1):
        raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")


# ----------------------------------------------------------------------------- selection


def _select(
    data: list[GroupData],
    *,
    confidence: float | None,
    threshold: float | None,
    min_keep: int,
    order: str,
    seed: int,
    estimator: Estimator,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Tensor], list[SelectionResult]]:
    """One output → input pass; returns per-group keep masks and selection results."""
    kept: list[Tensor] = [torch.ones(d.group.size, dtype=torch.bool) for d in data]
    results: list[SelectionResult] = []
    for i, d in enumerate(data):
        use = torch.ones(len(d.owner), dtype=torch.bool)
        for j in range(len(data)):
            rows = d.owner == j
            if rows.any():
                use[rows] = kept[j][d.unit[rows]]
        state = estimator.start(d.prepared, use.nonzero().flatten())
        res = terc(
            state,
            confidence=confidence,
            threshold=threshold,
            min_keep=min(min_keep, d.group.size),
            order=order,
            seed=seed + i,
        )
        kept[i] = res.support.clone()
        results.append(res)
        if log is not None:
            log(f"{d.group.name}: kept {int(kept[i].sum())} of {d.group.size} units")
    return kept, results


def _sparsity(
    kept: list[Tensor], data: list[GroupData], costs: CostModel, units_total: int
) -> dict[str, float]:
    removed = {d.group.name: ~k for d, k in zip(data, kept, strict=True)}
    params, macs = costs(removed)
    units = sum(int(k.sum()) for k in kept)
    return {
        "units": 1 - units / units_total,
        "params": 1 - params / costs.params_before,
        "macs": 1 - macs / costs.macs_before,
    }


def prune(
    model: nn.Module,
    data: ImageDataset | Tensor | tuple[Tensor, Tensor] | Iterable[Any],
    *,
    method: str | Method = "mipp",
    sparsity: float | None = None,
    confidence: float | None = None,
    threshold: float | None = None,
    match: PruneReport | None = None,
    target: Target = "units",
    allocation: Allocation | None = None,
    estimator: str | Estimator | None = None,
    pool: Pool | None = None,
    calib_samples: int = 2048,
    scope: Scope = "internal",
    min_keep: int | None = None,
    order: Literal["mi", "index", "random"] | None = None,
    tolerance: float = 0.01,
    compensate: bool = False,
    recalibrate_bn: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> PruneResult:
    """Prune ``model`` with MIPP or a baseline; the input model is never modified.

    Args:
        model: a trained (PaT) or freshly initialised (PaI) network (see
            :func:`mipp.structure.build_structure` for what it may contain).
        data: calibration source — an :class:`~mipp.data.ImageDataset` or a pair
            ``(inputs, labels)`` (a seeded subset of ``calib_samples`` is drawn), a tensor
            of inputs, or an iterable of batches. Methods that use the loss (SNIP, GraSP,
            SOSP-H, IMP's re-training) need labels.
        method: ``"mipp"`` (default), a baseline name from
            :data:`mipp.baselines.METHOD_NAMES`, or a configured
            :class:`~mipp.baselines.Method` (e.g. ``IMP(retrain=my_callback)``).
        sparsity / confidence / threshold: exactly one for MIPP (see the module
            docstring); baselines take ``sparsity`` (or ``match``).
        match: a :class:`~mipp.report.PruneReport` whose *achieved* ``target`` sparsity this
            run requests (equal-sparsity comparisons); replaces ``sparsity``.
        target: what ``sparsity`` counts: ``"units"`` (the paper's PR), ``"params"`` or
            ``"macs"``.
        allocation: baselines only — ``"global"`` ranking or ``"uniform"`` per-layer ratio
            (default: the method's own, see :mod:`mipp.baselines`), or ``"widths"``: keep
            exactly as many units per group as the ``match`` report did (e.g. MIPP's
            per-layer widths with units chosen by L1: allocation vs selection).
        estimator: MIPP only — ``"linear"`` (default), ``"gaussian"``, ``"mlp"``, ``"ksg"``
            or an estimator object.
        pool: MIPP only — per-channel pooling of conv maps, ``"mean"`` (default) or k (k×k).
        calib_samples: calibration set size (shared by every method).
        scope: ``"internal"`` prunes single-producer groups (block-internal in residual
            nets, every layer in plain ones); ``"all"`` also prunes residual streams.
        min_keep: MIPP only — units every group keeps at least (default 1: layer collapse
            is impossible). Baselines may collapse a layer; the report records it.
        order: MIPP only — TERC test order (``"mi"`` ascending as in the paper, default;
            ``"index"``, ``"random"`` for ablations).
        tolerance: allowed |achieved − requested| sparsity in target mode.
        compensate: after removal, re-fit every consumer of removed units by ridge least
            squares so its pre-activation outputs on the calibration data match the unpruned
            network's (:func:`mipp.compensation.compensate`; any method). For one-shot use.
        recalibrate_bn: after removal (and compensation), re-estimate BatchNorm running
            statistics on the calibration data (:func:`mipp.compensation.recalibrate_bn`).
        batch_size: calibration samples per forward pass.
        seed: calibration subset, random orders and scores, the mlp estimator.
        progress: log phases, bisection steps / rounds and per-layer results to stderr.

    Returns:
        :class:`PruneResult` with the pruned copy and its :class:`~mipp.report.PruneReport`.

    >>> import mipp, torch
    >>> from mipp.train import seeded
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
    for label, flag in (("compensate", compensate), ("recalibrate_bn", recalibrate_bn)):
        if not isinstance(flag, bool):
            raise ValueError(f"{label} must be True or False, got {flag!r}")
    widths = None
    if allocation == "widths":
        if match is None:
            raise ValueError("allocation='widths' keeps the per-layer widths of match=: pass it")
        widths = {g.name: g.width_after for g in match.groups}
    if match is not None:
        sparsity = matched_sparsity(match, sparsity, target, scope)
    if method != "mipp":
        pruned, report = prune_with_method(
            model,
            data,
            method=method,
            sparsity=sparsity,
            mipp_only={
                "confidence": confidence,
                "threshold": threshold,
                "estimator": estimator,
                "pool": pool,
                "min_keep": min_keep,
                "order": order,
            },
            target=target,
            allocation=allocation,
            calib_samples=calib_samples,
            scope=scope,
            tolerance=tolerance,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            compensate=compensate,
            recalibrate_bn=recalibrate_bn,
            widths=widths,
        )
        return PruneResult(model=pruned, report=report)
    if allocation is not None:
        raise ValueError(
            f"allocation={allocation!r} applies to baselines only; MIPP chooses per-layer "
            f"widths itself"
        )
    estimator = "linear" if estimator is None else estimator
    pool = "mean" if pool is None else pool
    min_keep = 1 if min_keep is None else min_keep
    order = "mi" if order is None else order
    check_options(
        sparsity, confidence, threshold, target, scope, pool, calib_samples, min_keep, tolerance
    )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    console = Console(stderr=True, quiet=not progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    est = make_estimator(estimator, seed=seed) if isinstance(estimator, str) else estimator
    est_name = getattr(est, "name", type(est).__name__)

    x, _ = calibration_inputs(data, calib_samples, seed=seed)
    work = copy.deepcopy(model)
    param = next(work.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    structure = build_structure(work, x[:2])
    groups = structure.in_scope(scope)
    if not groups:
        raise MippError(f"{type(model).__name__} has no prunable unit groups in scope {scope!r}")
    costs = CostModel(structure, x[:2])
    timings["structure"] = time.perf_counter() - t0

    t = time.perf_counter()
    layers = {n: m for n, m in work.named_modules() if n in structure.readers}
    batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
    if getattr(est, "streams", False):
        # closed forms: float64 moments accumulated while the data flows, O(D²) memory
        full = getattr(est, "needs_target_covariance", True)
        stream = StreamedMoments(structure, groups, pool, full_target=full)
        with console.status(f"streaming statistics of {len(x)} calibration samples"):
            stream_activations(work, batches, layers, pool=pool, on_batch=stream.update)
            gdata = stream.group_data()
        # interleaved: "statistics" is the time spent accumulating, "capture" the rest
        timings["statistics"] = stream.seconds
        timings["capture"] = time.perf_counter() - t - stream.seconds
    else:
        with console.status(f"capturing activations of {len(x)} calibration samples"):
            acts = capture_activations(work, batches, layers, pool=pool)
        timings["capture"] = time.perf_counter() - t
        t = time.perf_counter()
        with console.status("computing statistics"):
            # estimators that compute where their data is (ksg) get the model's device
            device = param.device if getattr(est, "device_aware", False) else None
            gdata = group_data(structure, groups, acts, est, pool, device=device)
        timings["statistics"] = time.perf_counter() - t
    need, worst = required_samples(gdata, est_name)
    if len(x) < need:
        raise ValueError(
            f"the calibration set has {len(x)} samples, but group {worst.group.name!r} has "
            f"{worst.group.size} units × {worst.features} features and a "
            f"{len(worst.owner)}-column target: the {est_name!r} estimator needs at least "
            f"{need} samples (raise calib_samples or supply more data)"
        )
    units_total = sum(g.size for g in groups)

    t = time.perf_counter()
    bisection: list[dict[str, float]] = []
    chosen_threshold = threshold

    def run(
        tau: float | None, log: Callable[[str], None] | None = None
    ) -> tuple[list[Tensor], list[SelectionResult], dict[str, float]]:
        kept, res = _select(
            gdata,
            confidence=confidence,
            threshold=tau,
            min_keep=min_keep,
            order=order,
            seed=seed,
            estimator=est,
            log=log,
        )
        return kept, res, _sparsity(kept, gdata, costs, units_total)

    if sparsity is None:
        kept, results, achieved = run(threshold, console.log)  # per-group progress
    else:
        kept, results, achieved, chosen_threshold = bisect_threshold(
            run, sparsity, target, tolerance, bisection, console
        )
    timings["selection"] = time.perf_counter() - t

    t = time.perf_counter()
    removed = {
        d.group.name: (~k).nonzero().flatten().tolist() for d, k in zip(gdata, kept, strict=True)
    }
    structure.remove(removed)
    timings["removal"] = time.perf_counter() - t
    fits, repair_times = finish(
        model,
        work,
        structure,
        removed,
        x,
        compensate_layers=compensate,
        recalibrate=recalibrate_bn,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    timings.update(repair_times)
    timings["total"] = time.perf_counter() - t0

    report = PruneReport(
        method="mipp",
        options={
            "estimator": est_name,
            "pool": pool,
            "calib_samples": len(x),
            "scope": scope,
            "min_keep": min_keep,
            "order": order,
            "tolerance": tolerance,
            "seed": seed,
            "confidence": confidence,
            "threshold": threshold,
            "sparsity": sparsity,
            "compensate": compensate,
            "recalibrate_bn": recalibrate_bn,
        },
        input_shape=list(x.shape[1:]),
        groups=[_group_report(d, k, r) for d, k, r in zip(gdata, kept, results, strict=True)],
        units_before=units_total,
        units_after=sum(int(k.sum()) for k in kept),
        params_before=costs.params_before,
        params_after=count_params(work),
        macs_before=costs.macs_before,
        macs_after=count_macs(work, x[:1]).macs,
        requested=sparsity,
        target=target,
        achieved=achieved,
        threshold=chosen_threshold,
        bisection=bisection,
        timings=timings,
        compensation=fits,
    )
    if sparsity is not None and abs(achieved[target] - sparsity) > tolerance:
        report.notes.append(
            f"requested {target} sparsity {sparsity:.4f} could not be met within "
            f"{tolerance}; achieved {achieved[target]:.4f} (the closest threshold)"
        )
    work.train(model.training)
    return PruneResult(model=work, report=report)


def _group_report(d: GroupData, kept: Tensor, res: SelectionResult) -> GroupReport:
    g = d.group
    return GroupReport(
        name=g.name,
        kind=g.kind,
        producers=list(g.producers),
        width_before=g.size,
        width_after=int(kept.sum()),
        kept=kept.nonzero().flatten().tolist(),
        removed=(~kept).nonzero().flatten().tolist(),
        order=res.order.tolist(),
        scores=res.scores.tolist(),
        deltas=res.deltas.tolist(),
        relative_deltas=res.relative_deltas.tolist(),
        pvalues=res.pvalues.tolist(),
        info_full=float(res.info_full),
        info_kept=float(res.info_kept),
        features_per_unit=d.features,
        target_columns=len(d.owner),
    )
