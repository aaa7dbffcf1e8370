"""The one pruning pipeline, the same for every method.

:func:`prune` draws the calibration set, copies the model, finds its unit groups, asks the
method to decide (:meth:`~mipp.methods.base.Method.decide`), keeps a dead placeholder unit in
any group the decision empties (layer collapse), removes the units physically, runs the
optional repairs and writes the :class:`~mipp.report.PruneReport`. MIPP and every baseline
go through exactly these steps; they differ only in the decision.

Between removal and repairs the removal is *verified*: a few calibration samples run through
the pruned model and through the model the removal started from with the removed units
switched off, and the two must agree (:mod:`mipp.surgery.verify`); otherwise a
:class:`~mipp.errors.PruningVerificationError` names the group whose channels the structural
backend mapped wrongly, and no model is returned.

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

from mipp import distributed
from mipp.errors import CalibrationError, InvalidOptionError, MippError
from mipp.inputs import Forward, Samples, reads_token_ids
from mipp.methods import (
    METHODS,
    TARGETS,
    Budget,
    Decision,
    Method,
    PruneContext,
    Target,
    make_method,
)
from mipp.metrics import count_macs, count_params
from mipp.modules import first_parameter, restore_modes, training_modes
from mipp.progress import ProgressCallback, Reporter
from mipp.report import GroupReport, PruneReport
from mipp.surgery.calibration import calibration_inputs, constant_groups
from mipp.surgery.costs import CostModel, measure_layer_latency
from mipp.surgery.layers import as_linears, check_modules, restore_transposed
from mipp.surgery.repair import finish
from mipp.surgery.structure import (
    SCOPES,
    ModelStructure,
    ReusedModuleError,
    Scope,
    build_structure,
)
from mipp.surgery.verify import VERIFY_SAMPLES, verify_removal
from mipp.validation import check_labels, check_match, check_model_input
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
        raise InvalidOptionError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if target not in TARGETS:
        raise InvalidOptionError(f"target must be one of {TARGETS}, got {target!r}")
    if scope not in SCOPES:
        raise InvalidOptionError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(calib_samples, bool) or not (
        isinstance(calib_samples, int) and calib_samples >= 1
    ):
        raise InvalidOptionError(f"calib_samples must be an integer >= 1, got {calib_samples!r}")
    if not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
        raise InvalidOptionError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise InvalidOptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(latency_batch, bool) or not (
        isinstance(latency_batch, int) and latency_batch >= 1
    ):
        raise InvalidOptionError(f"latency_batch must be an integer >= 1, got {latency_batch!r}")
    for label, flag in (("compensate", compensate), ("recalibrate_bn", recalibrate_bn)):
        if flag is not None and not isinstance(flag, bool):
            raise InvalidOptionError(
                f"{label} must be True, False or None (the method's default), got {flag!r}"
            )


def matched_sparsity(match: PruneReport, target: str, scope: str) -> float:
    """The achieved ``target`` sparsity of ``match``, checked to count the same units."""
    if not isinstance(match, PruneReport):
        raise TypeError(f"match must be a PruneReport, got {type(match).__name__}")
    if target not in match.achieved:
        raise InvalidOptionError(
            f"the report to match has no achieved {target!r} sparsity; it has "
            f"{sorted(match.achieved) or 'none'}"
        )
    their = match.options.get("scope", "internal")
    if their != scope:
        raise InvalidOptionError(
            f"the report to match was made with scope={their!r}; run with scope={their!r} so "
            f"both count the same units (got scope={scope!r})"
        )
    return float(match.achieved[target])


def _method(method: str | Method) -> Method:
    if isinstance(method, str):
        return make_method(method)
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be a name ({', '.join(METHODS)}) or a mipp.methods.Method, "
            f"got {type(method).__name__}"
        )
    return method


def prune(
    model: nn.Module,
    data: ImageDataset | Tensor | Mapping[str, Tensor] | tuple[Any, Tensor | None] | Iterable[Any],
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
    exclude: Iterable[str] = (),
    verify: bool = True,
    allow_degenerate: bool = False,
    forward: Forward | None = None,
    progress: ProgressCallback | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` with MIPP or a baseline; the input model is never modified.

    Args:
        model: a trained (PaT) or freshly initialised (PaI) network (see
            :func:`mipp.surgery.structure.build_structure` for what it may contain).
        data: calibration source — an :class:`~mipp.zoo.data.ImageDataset`, inputs, or a
            pair ``(inputs, labels)`` (labels may be None; a seeded subset of
            ``calib_samples`` is drawn), an iterable of batches (a ``DataLoader``) or of
            per-sample ``(input, label)`` pairs. Inputs are a tensor or numpy array
            ``(n, ...)`` of any dtype (``model(x)``), a dict of them (keyword arguments,
            ``model(**x)``) or, as the first element of a pair or batch, a tuple of them
            (positional arguments, ``model(*x)``), all with the leading dimension n. Floating
            inputs are moved to the model's device and dtype, integer and bool ones to its
            device only. Integer inputs stay integers (token ids, masks) except a bare
            integer tensor for a model without ``nn.Embedding`` / ``nn.EmbeddingBag``: that
            is taken for unscaled images and converted to float32, with an
            :class:`~mipp.surgery.calibration.UnscaledInputWarning` above 1. Every accepted
            form and what is refused is listed in :mod:`mipp.surgery.calibration`. The
            model must take the inputs (checked with two samples before any work:
            :class:`~mipp.errors.MippError` naming their shapes and torch's complaint).
            Labels are optional for MIPP and the weight- or activation-based baselines;
            methods that use the loss (SNIP, GraSP, SOSP-H, IMP's re-training) need integer
            class labels in range (checked likewise).
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
        batch_size: calibration samples per forward pass (per statistics batch on a CPU,
            where MIPP's capture runs each batch in pieces of about 8 MB of activations,
            :data:`mipp.surgery.capture.CPU_PIECE_BYTES`; set that to None for a model
            whose forward mixes the samples of a batch).
        seed: calibration subset, random orders and scores, the stochastic estimators.
        latency_batch: batch size of the latency table (``target="latency"``), e.g. 1 for
            single-sample serving, 64 for throughput.
        exclude: names of Conv/Linear/BatchNorm layers (as in ``model.named_modules()``;
            a group's name in the report is its first producer) whose units are never
            removed: every group a named layer produces or normalises is kept whole and
            left out of the report. A named *reused* module (one called more than once per
            forward, which is refused otherwise) is left exactly as it is: the groups it
            reads are kept whole too.
        verify: check, after removal and before any repair, that the pruned model is the
            model the removal started from with exactly the removed units switched off
            (:func:`mipp.surgery.verify.verify_removal`: 8 calibration samples, outputs
            equal within 1e-4 × their largest magnitude, 1e-2 for 16-bit floats); on
            mismatch a :class:`~mipp.errors.PruningVerificationError` names the group and no
            model is returned. Costs one extra copy of the model and two small forwards.
            ``False`` skips it — for advanced use only: the result is then *unverified*
            (the report says so) and may silently compute something else.
        allow_degenerate: prune on degenerate calibration data anyway, which is refused by
            default (:class:`~mipp.errors.CalibrationError`): a single distinct input, or
            fewer distinct inputs than half the samples
            (:func:`mipp.surgery.calibration.degenerate_reason`), or data on which every
            unit of some group is constant (:func:`~mipp.surgery.calibration.constant_groups`,
            one forward of 64 samples). MIPP would find almost every unit redundant on it.
        forward: ``forward(model, batch) -> Tensor``: how every stage runs a calibration
            batch (on the model's device, in the form of ``data``: a tensor, tuple or dict)
            and which output the pruning preserves. Default
            (:func:`mipp.inputs.default_forward`): ``model(x)``, ``model(*x)`` or
            ``model(**x)``, and of the result the tensor itself, its ``.logits`` (a Hugging
            Face ``ModelOutput``) or the first element of a tuple / list; any other output
            raises one :class:`~mipp.inputs.ModelOutputError` line suggesting ``forward=``.
            E.g. ``forward=lambda model, batch: model(**batch).pooler_output``. The report's
            options record its name (``__qualname__``).
        progress: a callable receiving :class:`~mipp.progress.ProgressEvent` objects (phases,
            bisection steps, rounds, per-layer results); everything is also logged (logger
            ``mipp.pipeline`` and the modules doing the work).

    Raises:
        PruningVerificationError: the removal did not give the original with exactly the
            removed units switched off (see ``verify``).
        ReusedModuleError: a Conv/Linear/BatchNorm module runs more than once in one
            forward and is not in ``exclude``.

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
    arguments = dict(locals())
    # under torch.distributed, a rank that fails tells the others (mipp.distributed)
    with distributed.guard():
        result = _prune(**arguments)
        distributed.check_peers()  # a rank that failed after the last collective
    return result


def _prune(
    model: nn.Module,
    data: Any,
    *,
    method: str | Method,
    sparsity: float | None,
    match: PruneReport | None,
    target: Target,
    calib_samples: int,
    scope: Scope,
    tolerance: float,
    compensate: bool | None,
    recalibrate_bn: bool | None,
    batch_size: int,
    seed: int,
    latency_batch: int,
    exclude: Iterable[str],
    verify: bool,
    allow_degenerate: bool,
    forward: Forward | None,
    progress: ProgressCallback | None,
) -> PruneResult:
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
    if not isinstance(verify, bool):
        raise InvalidOptionError(f"verify must be True or False, got {verify!r}")
    exclude = _exclude_names(exclude)
    m = _method(method)
    own_compensate, own_recalibrate = m.default_repairs()
    compensate = own_compensate if compensate is None else compensate
    recalibrate_bn = own_recalibrate if recalibrate_bn is None else recalibrate_bn
    widths = None
    if match is not None:
        if sparsity is not None:
            raise InvalidOptionError("give either sparsity= or match=, not both")
        sparsity = matched_sparsity(match, target, scope)
        widths = {g.name: g.width_after for g in match.groups}
    budget = Budget(sparsity=sparsity, target=target, tolerance=tolerance, widths=widths)
    m.check(budget)

    # calibrate → copy → structure
    if not isinstance(allow_degenerate, bool):
        raise InvalidOptionError(
            f"allow_degenerate must be True or False, got {allow_degenerate!r}"
        )
    if forward is not None and not callable(forward):
        raise InvalidOptionError(
            f"forward must be a callable forward(model, batch) -> Tensor, got {forward!r}"
        )
    check_modules(model)  # every module mipp cannot prune around, before any data is read
    distributed.check_same_model(model)  # under torch.distributed: the same on every rank
    inputs, y = calibration_inputs(
        data,
        calib_samples,
        seed=seed,
        allow_degenerate=allow_degenerate,
        keep_integers=reads_token_ids(model),
        shard=(distributed.rank(), distributed.world_size()),
    )
    modes = training_modes(model)
    work = copy.deepcopy(model).eval()
    # Hugging Face's Conv1D (GPT-2) is a Linear with its weight transposed: pruned as one,
    # given back as Conv1D
    transposed = as_linears(work)
    param = first_parameter(work)
    x = Samples(inputs, forward=forward).to(param.device, param.dtype)
    y = None if y is None else y.to(param.device)
    classes = check_model_input(work, x)  # one line naming the shapes, before any real work
    structure = build_structure(work, x[:2])
    frozen = _frozen_groups(structure, exclude, model)
    table = None
    if target == "latency":
        report("latency", f"measuring per-layer latency at batch {latency_batch}", transient=True)
        table = measure_layer_latency(work, x, batch_size=latency_batch)
    groups = [g for g in structure.in_scope(scope) if g.name not in frozen]
    if not groups:
        raise MippError(
            f"{type(model).__name__} has no prunable unit groups in scope {scope!r}"
            + (f" outside exclude={sorted(exclude)}" if exclude else "")
        )
    if not allow_degenerate:
        constant = constant_groups(work, x, groups)
        if constant:
            raise CalibrationError(
                f"the calibration data is degenerate for this model: every unit of "
                f"{', '.join(constant[:3])}{' …' if len(constant) > 3 else ''} is constant over "
                f"the samples, so nothing tells its units apart; give varied inputs, or pass "
                f"allow_degenerate=True (mipp prune --allow-degenerate) to prune anyway"
            )
    if match is not None:  # another model's report would prune this one to its share
        check_match(match, input_shape=x.sample_shape, groups=[g.name for g in groups])
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
        check_labels(y, classes, n=len(x), method=m.name)
    timings = ctx.timings
    timings["structure"] = time.perf_counter() - t0

    # decide (under torch.distributed: rank 0's decision, so every rank removes the same units)
    decision = distributed.broadcast_object(m.decide(ctx, budget))
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
    before = copy.deepcopy(work) if verify else None
    structure.remove(physical)
    timings["removal"] = time.perf_counter() - t

    # verify: the removal must be exact before any repair changes weights
    if before is not None:
        t = time.perf_counter()
        report("verify", "checking the pruned model against the masked original", transient=True)
        verify_removal(before, work, structure, physical, x[:VERIFY_SAMPLES])
        del before
        timings["verify"] = time.perf_counter() - t

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

    ranks = {"ranks": distributed.world_size()} if distributed.active() else {}
    result = PruneReport(
        method=m.name,
        options={
            **decision.options,
            "calib_samples": distributed.total(len(x)),  # every rank's samples
            **ranks,
            "scope": scope,
            "seed": seed,
            "sparsity": sparsity,
            "compensate": compensate,
            "recalibrate_bn": recalibrate_bn,
            **({"latency_batch": latency_batch} if table is not None else {}),
            **({"exclude": sorted(exclude)} if exclude else {}),
            **({} if verify else {"verify": False}),
            **(
                {"forward": getattr(forward, "__qualname__", "custom")}
                if forward is not None
                else {}
            ),
        },
        input_shape=list(x.sample_shape),
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
    if not verify:
        result.notes.append(
            "unverified: verify=False skipped the check that the pruned model is the original "
            "with exactly the removed units switched off"
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
    restore_transposed(work, transposed)
    return PruneResult(model=work, report=result)


def _exclude_names(exclude: Iterable[str]) -> frozenset[str]:
    if isinstance(exclude, str) or not isinstance(exclude, Iterable):
        raise InvalidOptionError(
            f"exclude must be a list of layer names, got {exclude!r}"
            + (f"; write exclude=[{exclude!r}]" if isinstance(exclude, str) else "")
        )
    names = list(exclude)
    for name in names:
        if not isinstance(name, str):
            raise InvalidOptionError(f"exclude must hold layer names (str), got {name!r}")
    return frozenset(names)


def _frozen_groups(
    structure: ModelStructure, exclude: frozenset[str], model: nn.Module
) -> set[str]:
    """Groups kept whole because of ``exclude``; refuses unknown names and reused layers."""
    layers = structure.calls
    for name in sorted(exclude):
        if name not in layers:
            listed = ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
            raise InvalidOptionError(
                f"exclude names {name!r}, which is not a Conv/Linear/BatchNorm layer of "
                f"{type(model).__name__}; its layers are: {listed}"
            )
    modules = dict(structure.model.named_modules())
    for name, n in structure.reused.items():
        if name not in exclude:
            raise ReusedModuleError(
                f"module {name!r} ({type(modules[name]).__name__}) is called {n} times in one "
                f"forward; a reused module cannot be pruned — exclude it: exclude=[{name!r}]"
            )
    reused = exclude & set(structure.reused)
    return structure.touching(reused) | {
        g.name for g in structure.groups if exclude & {*g.producers, *g.norms, *g.channelwise}
    }


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
