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
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from mipp import distributed
from mipp.errors import CalibrationError, InvalidOptionError
from mipp.estimators import ESTIMATOR_NAMES, Estimator, make_estimator
from mipp.methods.allocation import remove_while_closer
from mipp.methods.base import Budget, Decision, Method, PruneContext, sparsities
from mipp.methods.bisection import bisect_threshold
from mipp.methods.selection import DEFAULT_CONFIDENCE, ORDERS, Order, SelectionResult, terc
from mipp.methods.targets import (
    RESIDUALS,
    GroupData,
    Residual,
    StreamedMoments,
    branch_layers,
    compress_streams,
    group_columns,
    group_data,
)
from mipp.modules import first_parameter
from mipp.surgery.capture import OUTPUT, Pool, capture_activations, stream_activations

__all__ = ["MIPP"]


def check_estimator(estimator: Any) -> None:
    """Refuse an estimator that is neither a registered name nor an :class:`Estimator`."""
    if isinstance(estimator, str):
        if estimator not in ESTIMATOR_NAMES:
            raise ValueError(
                f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATOR_NAMES)}"
            )
    elif not isinstance(estimator, Estimator):
        raise TypeError(
            f"estimator must be a name ({', '.join(ESTIMATOR_NAMES)}) or a "
            f"mipp.estimators.Estimator, got {type(estimator).__name__}"
        )


def check_pool(pool: Any) -> Pool:
    """``"mean"`` or a positive integer k (k×k pooling), else a ``ValueError`` naming it."""
    if pool == "mean" or (isinstance(pool, int) and not isinstance(pool, bool) and pool >= 1):
        return pool
    raise ValueError(f"pool must be 'mean' or a positive integer k (k×k), got {pool!r}")


class MIPP(Method):
    """Mutual Information Preserving Pruning (Westphal, Hailes, Musolesi, arXiv 2411.00147).

    Args:
        estimator: the conditional-MI estimator, a name (``"gaussian"``, the default;
            ``"linear"``, ``"mlp"``, ``"ksg"``) or an :class:`~mipp.estimators.Estimator`.
            A name is built with the run's seed. ``None``: the default (``"linear"`` with
            ``paper=True``).
        pool: per-channel pooling of conv maps, ``"mean"`` (default) or k (k×k blocks).
        order: TERC test order: ``"mi"`` (ascending single-unit MI, the paper's; default),
            ``"index"`` or ``"random"`` (ablations).
        min_keep: units every group keeps at least (default 1: a layer cannot collapse).
        confidence: the paper's rule — keep unit i iff more than ``confidence`` sure that
            Δ_i > 0 (in (0, 1)). Not with a sparsity budget. With ``linear`` / ``gaussian``
            the test is held-out over 5 folds of the calibration rows (docs/METHOD.md §3;
            the estimator's ``folds`` option changes K, ``folds=0`` the in-sample test).
        threshold: one pass with a fixed threshold on the relative Δ_i (>= 0). Not with a
            sparsity budget or ``confidence``.
        cost_aware: compare each unit's relative Δ_i with τ · c_i / c̄ instead of τ, where
            c_i is what removing unit i saves (its producer rows and its consumers' input
            slices, given the units already removed downstream) and c̄ the mean over all
            units of the unpruned network: a Lagrangian trade of information against cost.
            ``None`` (default): on when the budget counts params or MACs, off for units.
            Threshold and target modes only (the confidence test is about information).
        reconstruct: after removal, re-fit each consumer on the kept units by ridge least
            squares and recalibrate BatchNorm (the mapping Theorem 1 says exists, realised
            on the calibration data; :func:`mipp.surgery.repair.compensate`). The pipeline
            does it when :func:`mipp.prune` is not given ``compensate`` / ``recalibrate_bn``
            itself. ``None``: on (off with ``paper=True``).
        residual: what a unit is measured against when its consumer is the last layer of a
            residual branch (its output is added to a stream): ``"sum"`` (default; the
            paper's rule, the activations after the addition, as the next layers read them)
            or ``"branch"`` (the consumer's own output before the addition: the shortcut,
            which the units do not produce, is left out of the target).
        stream_features: with ``scope="all"``, how many features a residual-stream unit
            keeps (default None: all). A stream channel is read at every depth of its
            stage, one feature block per tensor (a 6-block stage: 6 per unit), which makes
            its group's D = units × features the largest in the network; k keeps the k
            leading principal components of each unit's own readings (from the moments, no
            extra pass), so every D×D step costs (k/f)² to (k/f)³ as much [ours]. Threshold
            and target modes only.
        paper: the paper's procedure as published, one switch away from the defaults: the
            ``linear`` closed form of its loss-difference estimator and no reconstruction
            (options given explicitly still win). The paper's own trained-MLP estimator is
            ``estimator="mlp"``.

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
    #: the estimator used when none is named (chosen by the standard studies, docs/METHOD.md)
    default_estimator: ClassVar[str] = "gaussian"

    #: the estimator, reconstruction and test used by ``paper=True``
    paper_estimator: ClassVar[str] = "linear"

    def __init__(
        self,
        *,
        estimator: str | Estimator | None = None,
        pool: Pool = "mean",
        order: Order = "mi",
        min_keep: int = 1,
        confidence: float | None = None,
        threshold: float | None = None,
        cost_aware: bool | None = None,
        reconstruct: bool | None = None,
        residual: Residual = "sum",
        stream_features: int | None = None,
        paper: bool = False,
    ) -> None:
        if not isinstance(paper, bool):
            raise ValueError(f"paper must be True or False, got {paper!r}")
        if reconstruct is not None and not isinstance(reconstruct, bool):
            raise ValueError(f"reconstruct must be True, False or None, got {reconstruct!r}")
        if estimator is None:
            estimator = self.paper_estimator if paper else self.default_estimator
        self.paper = paper
        self.reconstruct = (not paper) if reconstruct is None else reconstruct
        check_estimator(estimator)
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
        if cost_aware is not None and not isinstance(cost_aware, bool):
            raise ValueError(f"cost_aware must be True, False or None (auto), got {cost_aware!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}; got {residual!r}")
        if stream_features is not None and (
            isinstance(stream_features, bool)
            or not isinstance(stream_features, int)
            or stream_features < 1
        ):
            raise ValueError(
                f"stream_features must be None (all) or an integer >= 1, got {stream_features!r}"
            )
        if stream_features is not None and confidence is not None:
            raise ValueError(
                "stream_features applies to threshold and target modes; confidence mode tests "
                "every feature of a unit (give one of them, not both)"
            )
        self.stream_features = stream_features
        self.residual: Residual = residual
        self.cost_aware = cost_aware
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
            "cost_aware": self.cost_aware,
            "reconstruct": self.reconstruct,
            "residual": self.residual,
            "stream_features": self.stream_features,
            "paper": self.paper,
        }

    def default_repairs(self) -> tuple[bool, bool]:
        """MIPP's reconstruction (re-fit + BatchNorm recalibration) unless turned off."""
        return self.reconstruct, self.reconstruct

    def cost_kind(self, budget: Budget) -> str | None:
        """``"params"`` / ``"macs"`` when the threshold is scaled by unit cost, else None."""
        if budget.target == "units" and self.cost_aware is not None and self.cost_aware:
            return "params"  # asked for explicitly with a units budget: trade against params
        if budget.target != "units" and self.cost_aware is not False:
            return budget.target
        return None

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
        gdata = self._statistics(
            ctx,
            est,
            folds=est.confidence_folds() if confidence is not None else 0,
            test=confidence is not None,
        )
        if distributed.rank() != 0:  # every rank holds the merged statistics; rank 0 selects
            return None  # type: ignore[return-value]  # the pipeline broadcasts rank 0's
        units_total = ctx.units_total

        t = time.perf_counter()
        trace: list[dict[str, float]] = []
        chosen = threshold
        fill_note = None

        kind = None if confidence is not None else self.cost_kind(budget)
        costs = _CostScale(ctx, gdata, kind) if kind is not None else None

        # each group's starting state for the target columns it had last; the bisection
        # forks it instead of rebuilding it when those columns come back unchanged (a
        # single pass, without a budget, keeps none)
        starts: dict[int, tuple[Tensor, Any]] | None = None if budget.sparsity is None else {}

        def run(
            tau: float | None, log: Callable[[str], None] | None = None
        ) -> tuple[list[Tensor], list[SelectionResult], dict[str, float]]:
            kept, res = self._select(gdata, est, confidence, tau, ctx.seed, log, costs, starts)
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

            below: list = []
            kept, results, achieved, chosen = bisect_threshold(
                run, budget.sparsity, budget.target, budget.tolerance, trace, step, below
            )
            if abs(achieved[budget.target] - budget.sparsity) > budget.tolerance and below:
                f_kept, f_ach, extra = self._fill(gdata, below[0], budget, ctx, costs)
                goal = budget.sparsity
                if extra and abs(f_ach[budget.target] - goal) < abs(achieved[budget.target] - goal):
                    kept, achieved = f_kept, f_ach
                    filled = (
                        f"achieved({budget.target}) jumps over the request as the threshold "
                        f"moves; {extra} more unit(s) with the smallest relative Δ were "
                        f"removed past the threshold to meet it"
                    )
                    fill_note = filled
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
                "cost_aware": kind,
                "reconstruct": self.reconstruct,
                "residual": self.residual,
                "stream_features": self.stream_features,
                "paper": self.paper,
            },
            trace=trace,
            threshold=chosen,
        )
        if fill_note:
            decision.notes.append(fill_note)
        note = budget.shortfall(achieved, "the closest threshold")
        if note:
            decision.notes.append(note)
        return decision

    def _fill(
        self,
        gdata: list[GroupData],
        candidate: tuple,
        budget: Budget,
        ctx: PruneContext,
        costs: _CostScale | None,
    ) -> tuple[list[Tensor], dict[str, float], int]:
        """From the best selection below the request, remove the kept units with the smallest
        relative Δ (per unit of cost when cost-aware) until the request is met."""
        kept, results = candidate[0], candidate[1]
        pairs = []
        for g, (k, r) in enumerate(zip(kept, results, strict=True)):
            rel = r.relative_deltas
            scale = (
                costs(g, kept) if costs is not None else torch.ones(len(rel), dtype=torch.float64)
            )
            for u in k.nonzero().flatten().tolist():
                d = float(rel[u])
                if d == d:  # tested (untested units are the min_keep ones)
                    pairs.append((d / max(float(scale[u]), 1e-12), g, u))
        order = [(g, u) for _, g, u in sorted(pairs)]
        min_keep = [min(self.min_keep, d.group.size) for d in gdata]
        units_total = ctx.units_total

        def measure(removed: list[Tensor]) -> dict[str, float]:
            return _sparsity([~r for r in removed], gdata, ctx, units_total)

        removed, achieved, count = remove_while_closer(
            [~k for k in kept],
            candidate[2],
            order,
            measure,
            budget.sparsity,
            budget.target,
            stop=budget.tolerance,
            min_keep=min_keep,
        )
        return [~r for r in removed], achieved, count

    def _statistics(
        self, ctx: PruneContext, est: Estimator, *, folds: int = 0, test: bool = True
    ) -> list[GroupData]:
        """Every group's prepared estimator statistics, in walk order (output → input).

        ``test``: whether Δ_i's significance test will be used (confidence mode): it decides
        how many calibration samples the estimator needs (:meth:`Estimator.min_samples`).

        ``folds``: K folds of moments for the held-out test (confidence mode with a closed
        form, :meth:`~mipp.estimators.Estimator.confidence_folds`); 0 (threshold and target
        modes) accumulates none, exactly as without the option."""
        work, structure, groups, x = ctx.model, ctx.structure, ctx.groups, ctx.inputs
        # the consumers' inputs (X) and the next layers' (Y; a next layer reading no group,
        # e.g. one fed by a width that is never pruned, gives its whole input)
        wanted = set(structure.readers) | {
            nxt for g in groups for c in g.consumers for nxt in structure.next_layers[c.layer]
        }
        layers = structure.recorded_modules(wanted)
        if self.residual == "branch":  # the last layers of residual branches: their outputs
            modules = ctx.modules
            layers.update({n + OUTPUT: modules[n] for n in branch_layers(structure, groups)})
        if distributed.active() and not est.streams:
            raise InvalidOptionError(
                f"the {est.name!r} estimator needs the calibration samples themselves, which "
                f"mipp does not gather across ranks; under torch.distributed use a closed form "
                f"(estimator='gaussian' or 'linear'), or prune on one process"
            )
        # wide groups keep their rows where the estimator can use them (gaussian's
        # sample-space form, and stream_features, which then projects the rows instead of a
        # D×D Gram; not under torch.distributed, which gathers moments and not rows)
        rows_over = (
            est.rows_if_wider_than(len(x))
            if hasattr(est, "rows_if_wider_than") and not folds and not distributed.active()
            else None
        )
        _check_samples(
            ctx,
            est,
            layers,
            self.pool,
            test=test,
            folds=folds,
            residual=self.residual,
            rows_over=rows_over,
        )
        t = time.perf_counter()
        batches = (x[i : i + ctx.batch_size] for i in range(0, len(x), ctx.batch_size))
        if est.streams:
            # closed forms: float64 moments accumulated while the data flows, O(D²) memory
            stream = StreamedMoments(
                structure,
                groups,
                self.pool,
                full_target=est.needs_target_covariance,
                folds=folds,
                residual=self.residual,
                rows_if_wider_than=rows_over,
            )
            ctx.report(
                "statistics",
                f"streaming statistics of {len(x)} calibration samples"
                + (f" in {folds} folds" if folds else ""),
                transient=True,
            )
            stream_activations(work, batches, layers, pool=self.pool, on_batch=stream.update)
            gdata = compress_streams(stream.group_data(), self.stream_features)
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
        gdata = group_data(
            structure,
            groups,
            acts,
            est,
            self.pool,
            device=device,
            residual=self.residual,
            stream_features=self.stream_features,
        )
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
        costs: _CostScale | None = None,
        starts: dict[int, tuple[Tensor, Any]] | None = None,
    ) -> tuple[list[Tensor], list[SelectionResult]]:
        """One output → input pass; returns per-group keep masks and selection results.

        With ``costs`` each group's threshold is scaled per unit by its current cost (given
        the groups already decided in this pass) relative to the network's mean unit cost.

        ``starts`` (group index → (target columns, untouched starting state)) is read and
        updated when the estimator's states can :meth:`fork`: a group whose target columns
        are the same as in the previous pass starts from a fork of its stored state, one
        whose columns changed from a state derived from the stored one
        (:meth:`~mipp.estimators.moments.ClosedFormState.retargeted`) when that costs fewer
        flops than a fresh start."""
        kept: list[Tensor] = [torch.ones(d.group.size, dtype=torch.bool) for d in data]
        results: list[SelectionResult] = []
        for i, d in enumerate(data):
            use = torch.ones(len(d.owner), dtype=torch.bool)
            for j in range(len(data)):
                rows = d.owner == j
                if rows.any():
                    use[rows] = kept[j][d.unit[rows]]
            columns = use.nonzero().flatten()
            stored = starts.pop(i, None) if starts is not None else None
            if stored is not None and torch.equal(stored[0], columns):
                starts[i] = stored
                state = stored[1].fork()
            else:
                if stored is not None and stored[1].retarget_saves(d.prepared, columns):
                    # the targets changed by a few columns: derive, do not rebuild
                    state = stored[1].retargeted(d.prepared, columns)
                else:
                    state = est.start(d.prepared, columns)
                if (
                    starts is not None
                    and getattr(state, "forkable", False)
                    and sum(_nbytes(s) for _, s in starts.values()) + _nbytes(state)
                    <= START_CACHE_BYTES
                ):
                    starts[i] = (columns, state)
                    state = state.fork()
            res = terc(
                state,
                confidence=confidence,
                threshold=threshold,
                min_keep=min(self.min_keep, d.group.size),
                order=self.order,
                seed=seed + i,
                scale=None if costs is None else costs(i, kept),
            )
            kept[i] = res.support.clone()
            results.append(res)
            if log is not None:
                log(f"{d.group.name}: kept {int(kept[i].sum())} of {d.group.size} units")
        return kept, results


#: memory the bisection may spend on stored starting states (beyond that, groups rebuild)
START_CACHE_BYTES = 2 * 1024**3


def _nbytes(state: Any) -> int:
    """Bytes held by a state's tensors."""
    return sum(v.nbytes for v in vars(state).values() if isinstance(v, Tensor))


class _CostScale:
    """Per-unit threshold scales c_i / c̄ for cost-aware selection (see ``MIPP``)."""

    def __init__(self, ctx: PruneContext, data: list[GroupData], kind: str) -> None:
        self.ctx, self.data, self.kind = ctx, data, kind
        start = ctx.costs.unit_costs({}, kind)
        names = [d.group.name for d in data]
        every = torch.cat([start[n] for n in names if n in start])
        mean = float(every.mean()) if every.numel() else 0.0
        self.mean = mean if mean > 0 else 1.0

    def __call__(self, i: int, kept: list[Tensor]) -> Tensor:
        """Scales for group ``i`` of the walk, the groups before it already decided."""
        removed = {d.group.name: ~kept[j] for j, d in enumerate(self.data[:i])}
        name = self.data[i].group.name
        cost = self.ctx.costs.unit_costs(removed, self.kind).get(name)
        if cost is None:
            return torch.ones(self.data[i].group.size, dtype=torch.float64)
        return cost / self.mean


def _check_samples(
    ctx: PruneContext,
    est: Estimator,
    layers: dict,
    pool: Pool,
    *,
    test: bool = True,
    folds: int = 0,
    residual: Residual = "sum",
    rows_over: int | None = None,
) -> None:
    """Refuse a calibration set too small for the estimator on the widest group, or
    statistics larger than the machine's memory (:func:`_check_memory`), from a two-sample
    probe of the layer sizes — before the statistics pass. Under ``torch.distributed`` the
    samples of every rank count."""
    n = distributed.total(len(ctx.inputs))
    shapes: list[tuple[int, int, int]] = []

    def probe(acts) -> None:
        if not shapes:
            for x, y, _, _ in group_columns(
                ctx.structure, ctx.groups, acts, pool, residual=residual
            ):
                shapes.append((x.shape[1], x.shape[2], y.shape[1]))

    stream_activations(ctx.model, [ctx.inputs[:2]], layers, pool=pool, on_batch=probe)
    _check_memory(ctx, est, shapes, folds, rows_over)
    need, worst = 0, None
    for g, (units, features, q) in zip(ctx.groups, shapes, strict=True):
        req = est.min_samples(units * features, q, test=test)
        if req > need:
            need, worst = req, (g, units, features, q)
    if worst is not None and n < need:
        g, units, features, q = worst
        raise CalibrationError(
            f"the calibration set has {n} samples, but group {g.name!r} has {units} units × "
            f"{features} features and a {q}-column target: the {est.name!r} estimator needs at "
            f"least {need} samples (raise calib_samples or supply more data)"
        )


def statistics_bytes(
    shapes: list[tuple[int, int, int]],
    *,
    full_target: bool,
    folds: int = 0,
    rows: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """(bytes of the float64 moments streamed for every group at once, bytes of the largest
    group's selection state) for the closed forms, from each group's (units, features per
    unit, target columns). A group of D = units × features features and q columns streams
    D² + D·q + q² numbers (q without the target covariance) per fold; selecting it holds
    about 6D² + 2D·q + 3q² (``gaussian``: A, P, Q_XX, Σ_Sy C_yy^(-1/2), C_yy, E, G, and up to
    two D×D Cholesky factors of its deferred removals) or 3D² + 2D·q (``linear``).
    ``rows=(n, wider_than)``: a group of more than ``wider_than`` features keeps its n rows
    and only their means and extremes, no products (n·D + n·q + 3(D + q)), and is selected
    in the sample space (``gaussian``'s :class:`~mipp.estimators.gaussian.GaussianDualState`:
    the rows, five n×n matrices and the standardised target rows, n·D + 5n² + n·q)."""
    parts = max(folds, 1) + (1 if folds else 0)  # the folds and their merged whole
    stream = state = 0
    for units, features, q in shapes:
        d = units * features
        if rows is not None and d > rows[1]:
            n = rows[0]
            stream += n * d + n * q + 3 * (d + q)
            state = max(state, n * d + 5 * n * n + n * q)
            continue
        stream += parts * (d * d + d * q + (q * q if full_target else q))
        held = 6 * d * d + 2 * d * q + 3 * q * q if full_target else 3 * d * d + 2 * d * q
        state = max(state, held)
    return 8 * stream, 8 * state


def machine_memory() -> int | None:
    """Physical memory in bytes, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(
    ctx: PruneContext,
    est: Estimator,
    shapes: list[tuple[int, int, int]],
    folds: int,
    rows_over: int | None = None,
) -> None:
    """Refuse, before the statistics pass, closed-form statistics that would not fit in
    90 % of the machine's memory, naming the widest group and what ``linear`` would need."""
    memory = machine_memory()
    if not est.streams or memory is None or not shapes:
        return
    full = est.needs_target_covariance
    # (rows are kept only on one process: its own samples are all of them)
    rows = None if rows_over is None else (len(ctx.inputs), rows_over)
    stream, state = statistics_bytes(shapes, full_target=full, folds=folds, rows=rows)
    if stream + state <= 0.9 * memory:
        return
    i = max(range(len(shapes)), key=lambda j: shapes[j][0] * shapes[j][1] + shapes[j][2])
    units, features, q = shapes[i]
    alt = ""
    if full:
        lin = sum(statistics_bytes(shapes, full_target=False, folds=folds))
        alt = f"; estimator='linear' keeps no target covariance and needs about {lin / 1e9:.1f} GB"
    raise CalibrationError(
        f"MIPP's {est.name!r} statistics would need about {(stream + state) / 1e9:.1f} GB, more "
        f"than 90 % of this machine's {memory / 1e9:.1f} GB (widest: group "
        f"{ctx.groups[i].name!r}, {units} units × {features} features, a {q}-column target)"
        f"{alt}, or exclude the widest groups (exclude=[...])"
    )


def _sparsity(
    kept: list[Tensor], data: list[GroupData], ctx: PruneContext, units_total: int
) -> dict[str, float]:
    """Achieved sparsity of a selection (units counted as 1 − kept / total)."""
    out = sparsities(
        ctx.costs,
        [d.group for d in data],
        {d.group.name: ~k for d, k in zip(data, kept, strict=True)},
    )
    units = sum(int(k.sum()) for k in kept)
    out["units"] = 1 - units / units_total
    return out


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
