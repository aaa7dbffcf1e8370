"""Gradient-based baselines: SNIP, GraSP, SynFlow, their iterative versions, SOSP-H and ProsPr.

SNIP, GraSP and SynFlow score single weights in their papers; here they are made structured
by **L1 aggregation** (:func:`~mipp.methods.scored.unit_sum`): a unit's score is the sum of
the absolute per-weight scores over its own parameters (every producer's weight rows and
bias entries). SOSP-H scores structures directly.

The loss is the mean cross-entropy over the calibration set,
``L = (1/n) Σ_i CE(f(x_i) / T, y_i)`` (``T = 1`` except for GraSP), accumulated over
``ctx.batch_size`` chunks, so scores do not depend on the chunking. The model runs in eval
mode (BatchNorm uses its running statistics) in its own dtype; scores are float64 on CPU.
Gradients are taken with :func:`torch.autograd.grad`, so no ``.grad`` is left on the model;
training flags and ``requires_grad`` flags are restored, and the weights are not changed.

The parameters θ the gradients and curvature products run over are the weights and biases
of every Conv/Linear layer (:func:`layer_parameters`); BatchNorm scales and shifts are not
part of θ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from mipp import distributed
from mipp.errors import MippError
from mipp.inputs import Samples, as_samples
from mipp.methods.base import PruneContext
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, unit_sum

__all__ = [
    "SNIP",
    "SOSPH",
    "GraSP",
    "IterativeGraSP",
    "IterativeSNIP",
    "ProsPr",
    "SynFlow",
    "gauss_newton_product",
    "hessian_vector_product",
    "layer_parameters",
    "loss_gradient",
    "prospr_loss",
]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
Batches = Sequence[tuple[Tensor | Samples, Tensor | None]]


# ----------------------------------------------------------------------------- helpers


def layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """θ: the weight and bias of every Conv1d/Conv2d/Linear layer, in module order.

    BatchNorm and other parameters are excluded; a parameter shared by two layers appears once.
    """
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, _LAYERS):
            continue
        for p in (module.weight, module.bias):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _count(batches: Batches) -> int:
    """n, the calibration samples of every rank under ``torch.distributed``
    (:mod:`mipp.distributed`: the sums below are then all-reduced, so every rank scores with
    the whole set's loss)."""
    n = distributed.total(sum(len(x) for x, _ in batches))
    if n == 0:
        raise MippError("no calibration samples to score with")
    return n


def _labels(y: Tensor | None) -> Tensor:
    if y is None:
        raise MippError("the loss needs labels: every batch must be a pair (inputs, labels)")
    return y


def _grad(output: Tensor, params: Sequence[Tensor], **kwargs: Any) -> list[Tensor]:
    """``autograd.grad`` with zeros for parameters the output does not depend on."""
    grads = torch.autograd.grad(output, list(params), allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@contextmanager
def _scoring(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``params`` inside the block; both restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def loss_gradient(
    model: nn.Module, batches: Batches, params: Sequence[Tensor], *, temperature: float = 1.0
) -> list[Tensor]:
    """``g = ∇_θ L`` with ``L = (1/n) Σ_i CE(f(x_i) / T, y_i)``, one tensor per parameter.

    ``batches`` are ``(x, y (b,))`` chunks of the n samples, x a tensor ``(b, *shape)`` or
    :class:`~mipp.inputs.Samples` (run by its ``forward``); each chunk's summed
    cross-entropy is scaled by ``1/n`` and the chunk gradients are added, so the result does
    not depend on the chunking. The model is used as it is (set eval mode yourself).
    """
    n = _count(batches)
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        logits = as_samples(x).run(model)
        loss = F.cross_entropy(logits / temperature, _labels(y), reduction="sum") / n
        for t, g in zip(total, _grad(loss, params), strict=True):
            t += g.detach()
    distributed.all_reduce_(total)  # every rank's chunks (no-op on one process)
    return total


def hessian_vector_product(
    model: nn.Module,
    batches: Batches,
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    *,
    temperature: float = 1.0,
) -> list[Tensor]:
    """``H v`` with ``H = ∇²_θ L`` the loss Hessian (same ``L`` as :func:`loss_gradient`).

    Per chunk b: ``g_b = ∇L_b`` with a graph, ``z = g_bᵀ v``, ``H_b v = ∇z``; the chunk
    products are added (``H = Σ_b H_b``). ``vector`` matches ``params`` tensor by tensor.
    GraSP uses ``v = g`` (Wang et al. 2020, Eq. 8).
    """
    n = _count(batches)
    v = [t.detach().to(p) for t, p in zip(vector, params, strict=True)]
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        logits = as_samples(x).run(model)
        loss = F.cross_entropy(logits / temperature, _labels(y), reduction="sum") / n
        grads = _grad(loss, params, create_graph=True)
        z = sum((g * t).sum() for g, t in zip(grads, v, strict=True))
        if not (isinstance(z, Tensor) and z.requires_grad):
            continue  # the loss is linear in θ on this chunk
        for t, h in zip(total, _grad(z, params), strict=True):
            t += h.detach()
    distributed.all_reduce_(total)  # every rank's chunks (no-op on one process)
    return total


class _Bound(nn.Module):
    """``model`` run on one batch, ``Samples.run`` (``forward=`` included): a module that
    :func:`torch.func.functional_call` can call with other parameters."""

    def __init__(self, model: nn.Module, x: Samples) -> None:
        super().__init__()
        self.model, self.x = model, x

    def forward(self) -> Tensor:
        return self.x.run(self.model)


def gauss_newton_product(
    model: nn.Module, batches: Batches, params: Sequence[nn.Parameter], vector: Sequence[Tensor]
) -> list[Tensor]:
    """``G v`` with G the (generalised) Gauss–Newton matrix of the mean cross-entropy.

    ``G = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i`` with ``J_i = ∂f(x_i)/∂θ`` (C × |θ|)
    the Jacobian of the logits and ``p_i = softmax(f(x_i))``. Per chunk: ``u = J v`` by a
    forward-mode JVP (:func:`torch.func.jvp` through :func:`torch.func.functional_call`),
    ``w = (diag(p) − ppᵀ) u``, then ``Jᵀ w / n`` by one backward pass. Labels are not used;
    ``params`` must be parameters of ``model`` and ``vector`` matches them tensor by tensor.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in names]
    if missing:
        raise MippError(f"gauss_newton_product: tensors of shapes {missing} are not parameters")
    keys = [f"model.{names[id(p)]}" for p in params]  # as seen from _Bound
    primals = tuple(p.detach() for p in params)
    tangents = tuple(t.detach().to(p) for t, p in zip(vector, params, strict=True))
    n = _count(batches)
    total = [torch.zeros_like(p) for p in params]
    for x, _ in batches:
        bound = _Bound(model, as_samples(x))

        def logits_of(*theta: Tensor, bound: _Bound = bound) -> Tensor:
            return functional_call(bound, dict(zip(keys, theta, strict=True)), ())

        _, u = jvp(logits_of, primals, tangents)
        logits = bound()
        p = torch.softmax(logits.detach(), dim=-1)
        w = p * u - p * (p * u).sum(-1, keepdim=True)
        for t, h in zip(total, _grad(logits, params, grad_outputs=w / n), strict=True):
            t += h.detach()
    distributed.all_reduce_(total)  # every rank's chunks (no-op on one process)
    return total


def _l1_scores(
    ctx: PruneContext, modules: Mapping[str, nn.Module], per_weight: Mapping[int, Tensor]
) -> dict[str, Tensor]:
    """Σ |per-weight score| over each unit's parameters (``per_weight`` keyed by ``id``)."""
    absolute = {k: v.abs() for k, v in per_weight.items()}
    return {g.name: unit_sum(g, modules, lambda p: absolute.get(id(p))) for g in ctx.groups}


def _check_temperature(temperature: Any) -> float:
    ok = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not (ok and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


# ----------------------------------------------------------------------------- methods


class SNIP(ScoredMethod):
    """Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity".

    Per weight, the connection sensitivity ``|g ⊙ w|`` with ``g = ∂L/∂w`` of the mean
    cross-entropy over the calibration set (Eq. 6, before normalisation, which does not
    change the ranking); structured via L1 aggregation: ``s_j = Σ_{w ∈ unit j} |g_w · w|``
    over the unit's weight rows and bias entries. One round by default; allocation global.

    >>> SNIP().rounds, SNIP.needs_labels
    (1, True)
    """

    name = "snip"
    summary = "Σ|g ⊙ w| over the unit's weights, L1-aggregated (Lee et al. 2019, SNIP)"
    default_allocation: Allocation = "global"
    needs_labels = True
    l1_aggregated = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        batches = list(ctx.batches())
        with _scoring(ctx.model, params):
            g = loss_gradient(ctx.model, batches, params)
        per_weight = {id(p): gi * p.detach() for p, gi in zip(params, g, strict=True)}
        return _l1_scores(ctx, ctx.modules, per_weight)


class GraSP(ScoredMethod):
    """Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient Flow".

    Logits are divided by ``temperature`` T (the paper's T = 200); ``g = ∇L`` and the
    Hessian-gradient product ``Hg`` (:func:`hessian_vector_product`, Eq. 8) over θ (Conv /
    Linear weights and biases). The per-weight score is ``S(−w) = −w ⊙ Hg`` (Eq. 9). The
    MIPP paper made GraSP structured by the L1 norm of each unit's scores:
    ``s_j = Σ_{w ∈ unit j} |w · (Hg)_w|`` over the unit's weight rows and bias entries,
    higher = keep (the unstructured paper instead removes the weights with the largest
    signed ``−w ⊙ Hg``). One round by default; allocation global.

    >>> GraSP().options()["temperature"]
    200.0
    """

    name = "grasp"
    summary = "Σ|w ⊙ Hg| over the unit's weights, logits / 200 (Wang et al. 2020, GraSP)"
    default_allocation: Allocation = "global"
    needs_labels = True
    l1_aggregated = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        temperature: float = 200.0,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        self.temperature = _check_temperature(temperature)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "temperature": self.temperature}

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        batches = list(ctx.batches())
        t = self.temperature
        with _scoring(ctx.model, params):
            g = loss_gradient(ctx.model, batches, params, temperature=t)
            hg = hessian_vector_product(ctx.model, batches, params, g, temperature=t)
        per_weight = {id(p): -p.detach() * h for p, h in zip(params, hg, strict=True)}
        return _l1_scores(ctx, ctx.modules, per_weight)


class SynFlow(ScoredMethod):
    """Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
    conserving synaptic flow".

    Data-free: on a float64 copy of the model in eval mode whose every floating tensor
    (parameters and buffers, e.g. BatchNorm running statistics) is replaced by its absolute
    value, ``R = 1ᵀ f_{|θ|}(1)`` for an all-ones input ``(1, *input_shape)`` — for a plain
    network ``R = 1ᵀ (Π_l |W_l|) 1`` (Eq. 2); the per-weight score is ``|∂R/∂w ⊙ w|``
    (synaptic saliency), structured via L1 aggregation over each unit's weight rows and bias
    entries. ``rounds = 100`` by default: the driver applies the exponential schedule, and
    masked units (zero weights) carry no flow. Allocation global.

    >>> SynFlow().rounds, SynFlow.needs_labels
    (100, False)
    """

    name = "synflow"
    summary = "Σ|∂R/∂w ⊙ w|, R = 1ᵀ(Π|W|)1, data-free, 100 rounds (Tanaka et al. 2020)"
    default_allocation: Allocation = "global"
    needs_labels = False
    l1_aggregated = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 100,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        net = copy.deepcopy(ctx.model).eval().double()
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.abs_()
        params = layer_parameters(net)
        for p in params:
            p.requires_grad_(True)
        x = ctx.inputs
        if not (isinstance(x.value, Tensor) and x.value.is_floating_point()):
            raise MippError(
                f"method 'synflow' runs an all-ones input, which needs one floating-point "
                f"input tensor; the calibration data has {x.describe()}"
            )
        ones = torch.ones((1, *x.sample_shape), dtype=torch.float64, device=x.device)
        flow = _grad(x.with_value(ones).run(net).sum(), params)
        per_weight = {id(p): gi * p.detach() for p, gi in zip(params, flow, strict=True)}
        return _l1_scores(ctx, dict(net.named_modules()), per_weight)


class IterativeSNIP(SNIP):
    """SNIP re-scored over ``rounds = 10`` pruning rounds (de Jorge et al. 2021; the MIPP
    paper's v2 pruning-at-initialisation baseline): each round scores the masked network.

    >>> IterativeSNIP().rounds
    10
    """

    name = "iterative-snip"
    summary = "SNIP re-scored over 10 rounds (de Jorge et al. 2021)"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 10,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )


class IterativeGraSP(GraSP):
    """GraSP re-scored over ``rounds = 10`` pruning rounds (the MIPP paper's v2
    pruning-at-initialisation baseline): each round scores the masked network.

    >>> IterativeGraSP().rounds
    10
    """

    name = "iterative-grasp"
    summary = "GraSP re-scored over 10 rounds (the MIPP paper's v2 baseline)"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 10,
        temperature: float = 200.0,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, temperature=temperature, normalize=normalize
        )


class SOSPH(ScoredMethod):
    """Nonnenmacher et al. 2022, "SOSP: Efficiently capturing global correlations by
    second-order structured pruning" (ICLR), the Hessian-vector-product variant SOSP-H.

    There is no public code; our reading of the paper. Removing structure s is the
    perturbation ``δθ_s = −θ ⊙ M_s``, with ``θ_s`` the unit's own parameters (its producers'
    weight rows and bias entries). To second order, with the Gauss–Newton matrix of the mean
    cross-entropy ``H = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i``
    (:func:`gauss_newton_product`), the loss change is
    ``δθ_sᵀ g + ½ δθ_sᵀ H Σ_{s'} δθ_{s'}``; SOSP-H approximates the cross-structure sum by
    the full perturbation (every structure removed: ``Σ_{s'} δθ_{s'} ≈ −θ``), giving

        λ_s = | −θ_sᵀ g + ½ θ_sᵀ (H θ) |,

    with ``g = ∇L``. ``H θ`` is one Gauss–Newton-vector product per calibration chunk. θ is
    every Conv/Linear weight and bias (BatchNorm parameters are excluded). Scores are
    per unit (the signed sum over the unit's parameters, then the absolute value), not L1
    aggregates of per-weight scores. Higher = keep; allocation global.

    >>> SOSPH().rounds, SOSPH.needs_labels
    (1, True)
    """

    name = "sosp-h"
    summary = "Gauss-Newton second-order saliency via Hessian-vector products (SOSP-H, 2022)"
    default_allocation: Allocation = "global"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        batches = list(ctx.batches())
        with _scoring(ctx.model, params):
            g = loss_gradient(ctx.model, batches, params)
            theta = [p.detach() for p in params]
            h_theta = gauss_newton_product(ctx.model, batches, params, theta)
        per_param = {
            id(p): p.detach() * (0.5 * ht - gi)
            for p, gi, ht in zip(params, g, h_theta, strict=True)
        }
        modules = ctx.modules
        return {
            grp.name: unit_sum(grp, modules, lambda p: per_param.get(id(p))).abs()
            for grp in ctx.groups
        }


class ProsPr(ScoredMethod):
    """Alizadeh et al. 2022, "Prospect Pruning: Finding Trainable Weights at Initialization
    using Meta-Gradients", with a mask per unit.

    Every unit j gets a multiplicative mask c_j = 1 on its parameters (its weight rows and
    bias entries, every producer's). From θ₀ ⊙ c the network takes ``steps`` SGD steps at
    ``lr`` on successive calibration chunks (``batch_size`` samples; all Conv/Linear
    parameters move), θ_{k+1} = θ_k − lr ∇L_k(θ_k), and the loss L_M(θ_M) on the next chunk
    is differentiated through those steps with respect to c (a meta-gradient: second order,
    :func:`torch.autograd.grad` with ``create_graph``). A unit scores |∂L_M/∂c_j|: how much
    the loss *after a little training* depends on keeping it. The paper's masks are
    per-weight; per-unit masks give the structured score directly. The steps run in training
    mode (BatchNorm on batch statistics, its running averages updated in copies); the
    model's weights, buffers and modes are not changed. Needs labels; allocation global.
    """

    name = "prospr"
    summary = "|∂L(θ_M)/∂c|, the meta-gradient through M SGD steps (Alizadeh et al. 2022)"
    default_allocation: Allocation = "global"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
        steps: int = 3,
        lr: float = 0.01,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.steps, self.lr = steps, float(lr)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "steps": self.steps, "lr": self.lr}

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        chunks = list(ctx.batches())
        if distributed.active():
            raise MippError("method 'prospr' unrolls training steps on one process's chunks")
        masks = {
            g.name: torch.ones(g.size, dtype=torch.float64, requires_grad=True) for g in ctx.groups
        }
        final = prospr_loss(ctx.model, ctx.groups, masks, chunks, self.steps, self.lr)
        grads = torch.autograd.grad(final, list(masks.values()), allow_unused=True)
        return {
            name: (torch.zeros(len(m), dtype=torch.float64) if g is None else g.detach().abs())
            for (name, m), g in zip(masks.items(), grads, strict=True)
        }


def prospr_loss(
    model: nn.Module,
    groups: Sequence[Any],
    masks: Mapping[str, Tensor],
    chunks: Batches,
    steps: int,
    lr: float,
) -> Tensor:
    """L_M(θ_M) of :class:`ProsPr` as a function of the unit masks (differentiable in them).

    θ₀ is every Conv/Linear weight and bias; unit j of group g scales its producers' rows by
    ``masks[g][j]``. Step k trains on ``chunks[k % len(chunks)]``, the final loss is taken
    on ``chunks[steps % len(chunks)]``; losses are mean cross-entropies.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    params = layer_parameters(model)
    modules = dict(model.named_modules())
    theta: dict[str, Tensor] = {
        names[id(p)]: p.detach().clone().requires_grad_(True) for p in params
    }
    for g in groups:
        mask = masks[g.name]
        for producer in g.producers:
            module = modules[producer]
            rows = torch.ones(module.weight.shape[0], dtype=mask.dtype)
            scale = rows.index_put(
                (torch.tensor([c for ix in g.producer_index[producer] for c in ix]),),
                torch.repeat_interleave(
                    mask, torch.tensor([len(ix) for ix in g.producer_index[producer]])
                ),
            )
            for param in (module.weight, module.bias):
                if param is None:
                    continue
                key = names[id(param)]
                shaped = scale.reshape(-1, *([1] * (param.ndim - 1))).to(param.dtype)
                theta[key] = theta[key] * shaped.to(param.device)
    keys = list(theta)
    # the steps train: BatchNorm normalises with batch statistics, its running averages
    # updated in copies (the model's own buffers and modes are left as they were)
    buffers = {f"model.{n}": b.detach().clone() for n, b in model.named_buffers()}
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        for k in range(steps + 1):
            x, y = chunks[k % len(chunks)]
            bound = _Bound(model, as_samples(x))
            state = {**buffers, **{f"model.{n}": t for n, t in theta.items()}}
            loss = F.cross_entropy(functional_call(bound, state, ()), _labels(y))
            if not torch.isfinite(loss):
                raise MippError(
                    f"ProsPr's inner training diverged at step {k} of {steps} (loss "
                    f"{float(loss)}); lower lr (lr={lr})"
                )
            if k == steps:
                return loss
            grads = _grad(loss, [theta[n] for n in keys], create_graph=True)
            theta = {n: theta[n] - lr * g for n, g in zip(keys, grads, strict=True)}
    finally:
        for m, training in modes:
            m.training = training
    raise AssertionError("unreachable")
