"""MIPP as a method: capture → statistics → output-to-input TERC selection (docs/METHOD.md §2).

The pipeline hands :class:`MIPP` the working copy of the model, its unit groups and the
calibration inputs. MIPP records what every consumer layer reads (:mod:`mipp.surgery.capture`)
and walks the groups from the output towards the input. For group l the target is what its
consumers produce — the next layer's activations restricted to the units already kept there
(the logits for the last hidden layer) — and the TERC selection of
:mod:`mipp.methods.selection` keeps the units whose conditional information about that target
is significant. Statistics are computed once per group; in target mode the bisection of
:mod:`mipp.methods.bisection` re-runs only the selection loop. For the closed-form estimators
(``linear``, ``gaussian``) the statistics are float64 second moments accumulated batch by
batch while the calibration data flows through the network, so no activations are held.

How much is removed (exactly one rule):

- a sparsity budget (target mode, ``mipp.prune(..., sparsity=)``): one global threshold on
  the *relative* Δ_i is bisected until the achieved sparsity of units, params or MACs is
  within the tolerance. Per-layer ratios come from the method;
- ``confidence=`` (the paper's rule): keep a unit iff we are more than ``confidence`` sure
  that Δ_i > 0;
- ``threshold=``: one pass with a fixed threshold on the relative Δ_i.

Without a budget and without either option, MIPP uses the paper's rule at confidence 0.95 —
the same default as the tensor-level :class:`~mipp.methods.selection.MIPPSelector`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from mipp.errors import CalibrationError
from mipp.estimators import ESTIMATOR_NAMES, Estimator, make_estimator
from mipp.methods.base import Budget, Decision, Method, PruneContext
from mipp.methods.bisection import bisect_threshold
from mipp.methods.selection import DEFAULT_CONFIDENCE, ORDERS, Order, SelectionResult, terc
from mipp.methods.targets import GroupData, StreamedMoments, group_columns, group_data
from mipp.modules import first_parameter
from mipp.surgery.capture import Pool, capture_activations, stream_activations

__all__ = ["MIPP"]


def check_pool(pool: Any) -> Pool:
    """``"mean"`` or a positive integer k (k×k pooling), else a ``ValueError`` naming it."""
    if pool == "mean" or (isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1):
        return pool
    raise ValueError(f"pool must be 'mean' or a positive integer k (k×k), got {pool!r}")


class MIPP(Method):
    """Mutual Information Preserving Pruning (Westphal, Hailes, Musolesi, arXiv 2411.00147).

    Args:
        estimator: the conditional-MI estimator, a name (``"linear"``, the default;
            ``"gaussian"``, ``"mlp"``, ``"ksg"``) or an :class:`~mipp.estimators.Estimator`.
            A name is built with the run's seed.
        pool: per-channel pooling of conv maps, ``"mean"`` (default) or k (k×k blocks).
        order: TERC test order: ``"mi"`` (ascending single-unit MI, the paper's; default),
            ``"index"`` or ``"random"`` (ablations).
        min_keep: units every group keeps at least (default 1: a layer cannot collapse).
        confidence: the paper's rule — keep unit i iff more than ``confidence`` sure that
            Δ_i > 0 (in (0, 1)). Not with a sparsity budget.
        threshold: one pass with a fixed threshold on the relative Δ_i (>= 0). Not with a
            sparsity budget or ``confidence``.

    >>> import mipp, torch
    >>> from mipp import seeded
    >>> with seeded(0):
    ...     net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    >>> x = torch.randn(512, 1, 28, 28)
    >>> result = mipp.prune(net, x, method=MIPP(estimator="gaussian"), sparsity=0.5)
    >>> result.report.options["estimator"], abs(result.report.achieved["units"] - 0.5) <= 0.01
    ('gaussian', True)
    """

    name = "mipp"
    summary = "Mutual Information Preserving Pruning (Westphal et al. 2024): TERC on conditional MI"
    needs_labels = False
    needs_budget = False
    #: the estimator used when none is named
    default_estimator: ClassVar[str] = "linear"

    def __init__(
        self,
        *,
        estimator: str | Estimator = "linear",
        pool: Pool = "mean",
        order: Order = "mi",
        min_keep: int = 1,
        confidence: float | None = None,
        threshold: float | None = None,
    ) -> None:
        if isinstance(estimator, str):
            if estimator not in ESTIMATOR_NAMES:
                raise ValueError(
                    f"unknown estimator {estimator!r}; valid estimators: "
                    f"{', '.join(ESTIMATOR_NAMES)}"
                )
        elif not isinstance(estimator, Estimator):
            raise TypeError(
                f"estimator must be a name ({', '.join(ESTIMATOR_NAMES)}) or a "
                f"mipp.estimators.Estimator, got {type(estimator).__name__}"
            )
        self.pool = check_pool(pool)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
            raise ValueError(f"min_keep must be an integer >= 1, got {min_keep!r}")
        if confidence is not None and threshold is not None:
            raise ValueError("give MIPP confidence= or threshold=, not both")
        if confidence is not None and not (
            isinstance(confidence, int | float)
            and not isinstance(confidence, bool)
            and 0 < confidence < 1
        ):
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        if threshold is not None and not (
            isinstance(threshold, int | float)
            and not isinstance(threshold, bool)
            and math.isfinite(threshold)
            and threshold >= 0
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.estimator = estimator
        self.order: Order = order
        self.min_keep = min_keep
        self.confidence = confidence
        self.threshold = threshold

    @property
    def estimator_name(self) -> str:
        est = self.estimator
        return est if isinstance(est, str) else est.name

    def options(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator_name,
            "pool": self.pool,
            "order": self.order,
            "min_keep": self.min_keep,
            "confidence": self.confidence,
            "threshold": self.threshold,
        }

    def check(self, budget: Budget) -> None:
        if budget.sparsity is not None and (
            self.confidence is not None or self.threshold is not None
        ):
            rule = "confidence" if self.confidence is not None else "threshold"
            raise ValueError(
                f"MIPP({rule}=...) is its own stopping rule and a sparsity budget sets the "
                f"threshold by bisection: give one of them, not both"
            )

    def stopping_rule(self, budget: Budget) -> tuple[float | None, float | None]:
        """``(confidence, threshold)`` of one selection pass without a budget: the given
        threshold, else the given confidence, else the paper's default 0.95."""
        if budget.sparsity is not None or self.threshold is not None:
            return None, self.threshold
        return (self.confidence if self.confidence is not None else DEFAULT_CONFIDENCE), None

    # ------------------------------------------------------------------------- decide

    def decide(self, ctx: PruneContext, budget: Budget) -> Decision:
        est = (
            make_estimator(self.estimator, seed=ctx.seed)
            if isinstance(self.estimator, str)
            else self.estimator
        )
        confidence, threshold = self.stopping_rule(budget)
        gdata = self._statistics(ctx, est)
        units_total = ctx.units_total

        t = time.perf_counter()
        trace: list[dict[str, float]] = []
        chosen = threshold

        def run(
            tau: float | None, log: Callable[[str], None] | None = None
        ) -> tuple[list[Tensor], list[SelectionResult], dict[str, float]]:
            kept, res = self._select(gdata, est, confidence, tau, ctx.seed, log)
            return kept, res, _sparsity(kept, gdata, ctx, units_total)

        if budget.sparsity is None:
            kept, results, achieved = run(threshold, lambda line: ctx.report("selection", line))
        else:

            def step(tau: float, ach: dict[str, float]) -> None:
                ctx.report(
                    "bisection",
                    f"threshold {tau:.3e} → {budget.target} sparsity {ach[budget.target]:.4f}",
                    threshold=tau,
                    **ach,
                )

            kept, results, achieved, chosen = bisect_threshold(
                run, budget.sparsity, budget.target, budget.tolerance, trace, step
            )
        ctx.timings["selection"] = time.perf_counter() - t

        decision = Decision(
            removed={d.group.name: ~k for d, k in zip(gdata, kept, strict=True)},
            achieved=achieved,
            groups={d.group.name: _group_fields(d, r) for d, r in zip(gdata, results, strict=True)},
            options={
                "estimator": est.name,
                "pool": self.pool,
                "min_keep": self.min_keep,
                "order": self.order,
                "tolerance": budget.tolerance,
                "confidence": confidence,
                "threshold": self.threshold,
            },
            trace=trace,
            threshold=chosen,
        )
        note = budget.shortfall(achieved, "the closest threshold")
        if note:
            decision.notes.append(note)
        return decision

    def _statistics(self, ctx: PruneContext, est: Estimator) -> list[GroupData]:
        """Every group's prepared estimator statistics, in walk order (output → input)."""
        work, structure, groups, x = ctx.model, ctx.structure, ctx.groups, ctx.inputs
        layers = {n: m for n, m in work.named_modules() if n in structure.readers}
        _check_samples(ctx, est, layers, self.pool)
        t = time.perf_counter()
        batches = (x[i : i + ctx.batch_size] for i in range(0, len(x), ctx.batch_size))
        if est.streams:
            # closed forms: float64 moments accumulated while the data flows, O(D²) memory
            stream = StreamedMoments(
                structure, groups, self.pool, full_target=est.needs_target_covariance
            )
            ctx.report(
                "statistics",
                f"streaming statistics of {len(x)} calibration samples",
                transient=True,
            )
            stream_activations(work, batches, layers, pool=self.pool, on_batch=stream.update)
            gdata = stream.group_data()
            # interleaved: "statistics" is the time spent accumulating, "capture" the rest
            ctx.timings["statistics"] = stream.seconds
            ctx.timings["capture"] = time.perf_counter() - t - stream.seconds
            return gdata
        ctx.report(
            "calibration", f"capturing activations of {len(x)} calibration samples", transient=True
        )
        acts = capture_activations(work, batches, layers, pool=self.pool)
        ctx.timings["capture"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx.report("statistics", "computing statistics", transient=True)
        device = est.data_device(first_parameter(work).device)
        gdata = group_data(structure, groups, acts, est, self.pool, device=device)
        ctx.timings["statistics"] = time.perf_counter() - t
        return gdata

    def _select(
        self,
        data: list[GroupData],
        est: Estimator,
        confidence: float | None,
        threshold: float | None,
        seed: int,
        log: Callable[[str], None] | None,
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
            state = est.start(d.prepared, use.nonzero().flatten())
            res = terc(
                state,
                confidence=confidence,
                threshold=threshold,
                min_keep=min(self.min_keep, d.group.size),
                order=self.order,
                seed=seed + i,
            )
            kept[i] = res.support.clone()
            results.append(res)
            if log is not None:
                log(f"{d.group.name}: kept {int(kept[i].sum())} of {d.group.size} units")
        return kept, results


def _check_samples(ctx: PruneContext, est: Estimator, layers: dict, pool: Pool) -> None:
    """Refuse a calibration set too small for the estimator on the widest group, from a
    two-sample probe of the layer sizes — before the statistics pass."""
    n = len(ctx.inputs)
    shapes: list[tuple[int, int, int]] = []

    def probe(acts) -> None:
        if not shapes:
            for x, y, _, _ in group_columns(ctx.structure, ctx.groups, acts, pool):
                shapes.append((x.shape[1], x.shape[2], y.shape[1]))

    stream_activations(ctx.model, [ctx.inputs[:2]], layers, pool=pool, on_batch=probe)
    need, worst = 0, None
    for g, (units, features, q) in zip(ctx.groups, shapes, strict=True):
        req = est.min_samples(units * features, q)
        if req > need:
            need, worst = req, (g, units, features, q)
    if worst is not None and n < need:
        g, units, features, q = worst
        raise CalibrationError(
            f"the calibration set has {n} samples, but group {g.name!r} has {units} units × "
            f"{features} features and a {q}-column target: the {est.name!r} estimator needs at "
            f"least {need} samples (raise calib_samples or supply more data)"
        )


def _sparsity(
    kept: list[Tensor], data: list[GroupData], ctx: PruneContext, units_total: int
) -> dict[str, float]:
    """Achieved sparsity of a selection (units counted as 1 − kept / total)."""
    params, macs = ctx.costs({d.group.name: ~k for d, k in zip(data, kept, strict=True)})
    units = sum(int(k.sum()) for k in kept)
    return {
        "units": 1 - units / units_total,
        "params": 1 - params / ctx.costs.params_before,
        "macs": 1 - macs / ctx.costs.macs_before,
    }


def _group_fields(d: GroupData, res: SelectionResult) -> dict[str, Any]:
    """The MIPP-specific fields of a group's report."""
    return {
        "order": res.order.tolist(),
        "scores": res.scores.tolist(),
        "deltas": res.deltas.tolist(),
        "relative_deltas": res.relative_deltas.tolist(),
        "pvalues": res.pvalues.tolist(),
        "info_full": float(res.info_full),
        "info_kept": float(res.info_kept),
        "features_per_unit": d.features,
        "target_columns": len(d.owner),
    }
