"""First-order Taylor importance (Molchanov et al. 2017 and 2019), Network Slimming (Liu et al.
2017) and Collaborative Channel Pruning (Peng et al. 2019), implemented from their papers.

Taylor: removing a unit changes the loss by about the first-order term of its Taylor
expansion. Molchanov et al. 2017 ("Pruning Convolutional Neural Networks for Resource
Efficient Inference") expand in the unit's *activation*; Molchanov et al. 2019 ("Importance
Estimation for Neural Network Pruning") in its *weights*. Network Slimming scores a channel by
the scale γ of the BatchNorm that normalises it, after training with an L1 penalty on every γ.

Gradients are of the cross-entropy on the calibration set, in eval mode (BatchNorm uses its
running statistics), with :func:`torch.autograd.grad` (no ``.grad`` is left on the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp import distributed
from mipp.errors import MippError
from mipp.inputs import as_samples
from mipp.methods.base import PruneContext
from mipp.methods.baselines.gradient import _count, _labels, _scoring, layer_parameters
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, unit_maps, unit_sum
from mipp.modules import first_parameter
from mipp.surgery.layers import NORMS
from mipp.surgery.structure import UnitGroup
from mipp.zoo.config import TrainConfig
from mipp.zoo.training import train

__all__ = [
    "CollaborativeChannelPruning",
    "NetworkSlimming",
    "TaylorActivation",
    "TaylorWeight",
    "gamma_l1_penalty",
    "quadratic_greedy_scores",
]


@contextmanager
def _stash_inputs(modules: dict[str, nn.Module], names: list[str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, the first input of each named module in every forward, by name."""
    got: dict[str, Tensor] = {}
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            got.setdefault(name, args[0])

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make(name)))
        yield got
    finally:
        for h in handles:
            h.remove()


class TaylorActivation(ScoredMethod):
    """Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference": the first-order Taylor criterion on activations.

    For each calibration example i and unit j, with a_ij the unit's activation map as the next
    layer reads it (the group's first consumer: after BatchNorm and nonlinearity; M
    positions, one for a neuron) and C_i the example's cross-entropy,

        Θ_ij = | (1/M) Σ_m a_ijm · ∂C_i/∂a_ijm |,        s_j = (1/n) Σ_i Θ_ij        (Eq. 8)

    — the estimated change of the loss if the map were zeroed, averaged over examples. The
    paper ranks globally after a layer-wise ℓ2 normalisation of the scores
    (``normalize="l2"``, the default here). Needs labels.
    """

    name = "taylor"
    summary = "|mean(a ⊙ ∂C/∂a)| of the unit's map, per example (Molchanov et al. 2017)"
    default_allocation: Allocation = "global"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "l2",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        batches = list(ctx.batches())
        n = _count(batches)
        modules = ctx.modules
        readers = list(dict.fromkeys(g.consumers[0].layer for g in ctx.groups))
        total = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in ctx.groups}
        with _scoring(ctx.model, params):
            for x, y in batches:
                with _stash_inputs(modules, readers) as got:
                    logits = as_samples(x).run(ctx.model)
                # the sum of the examples' losses: example i's activations get ∂C_i/∂a_i
                loss = F.cross_entropy(logits, _labels(y), reduction="sum")
                acts = [got[r] for r in readers]
                grads = torch.autograd.grad(loss, acts, allow_unused=True)
                by_reader = dict(zip(readers, zip(acts, grads, strict=True), strict=True))
                for g in ctx.groups:
                    a, ga = by_reader[g.consumers[0].layer]
                    if ga is None:  # the loss does not depend on this input
                        continue
                    prod = unit_maps(a.detach() * ga, g.consumers[0])  # (b, units, h, w)
                    theta = prod.flatten(2).mean(-1).abs().double().sum(0).cpu()
                    total[g.name] += theta
        distributed.all_reduce_(list(total.values()))
        return {name: t / n for name, t in total.items()}


class TaylorWeight(ScoredMethod):
    """Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning": the
    first-order Taylor criterion on a unit's parameters.

    Removing unit j sets its parameters W_j (the producer's weight rows and bias entries,
    every producer's for a group tied by additions) to zero; to first order the loss changes
    by Σ_{w ∈ W_j} g_w w, and the unit's importance is its square (Eq. 6, "group"
    contribution)

        s_j = ( Σ_{w ∈ W_j} g_w · w )²,        g = ∇_θ L,  L the mean cross-entropy.

    The paper averages the per-minibatch importance over the minibatches of its pruning
    interval; here g is the gradient of the whole calibration set's mean loss (one batch of
    all n samples, so the score does not depend on how the set is chunked). Its BatchNorm
    variant (scoring γ and β) is not implemented: the weights are. Needs labels; allocation
    global, scores normalised by their mean per layer as for every scored method.
    """

    name = "taylor-weight"
    summary = "(Σ g·w over the unit's weights)² (Molchanov et al. 2019)"
    default_allocation: Allocation = "global"
    needs_labels = True

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        from mipp.methods.baselines.gradient import loss_gradient

        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        batches = list(ctx.batches())
        with _scoring(ctx.model, params):
            g = loss_gradient(ctx.model, batches, params)
        per = {id(p): gi * p.detach() for p, gi in zip(params, g, strict=True)}
        modules = ctx.modules
        return {
            grp.name: unit_sum(grp, modules, lambda p: per.get(id(p))) ** 2 for grp in ctx.groups
        }


# ----------------------------------------------------------------------------- slimming


def _scales(model: nn.Module) -> list[nn.Parameter]:
    """The per-channel scales γ of every normalisation layer with an affine weight."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, NORMS) and getattr(m, "weight", None) is not None
    ]


def gamma_l1_penalty(weight: float) -> Callable[[nn.Module], Tensor]:
    """Network Slimming's sparsity regulariser as a training penalty: ``λ Σ |γ|`` over the
    scales of every normalisation layer (``mipp.train(..., penalty=gamma_l1_penalty(λ))``).
    Its gradient is ``λ sign(γ)`` (the paper's subgradient)."""
    if not (isinstance(weight, int | float) and not isinstance(weight, bool) and weight >= 0):
        raise ValueError(f"penalty weight must be a number >= 0, got {weight!r}")

    def penalty(model: nn.Module) -> Tensor:
        scales = _scales(model)
        if not scales:
            return torch.zeros((), device=first_parameter(model).device)
        return weight * sum(g.abs().sum() for g in scales)

    return penalty


def _norm_scores(g: UnitGroup, modules: dict[str, nn.Module]) -> Tensor | None:
    """Mean |γ| over the group's normalisation layers for each unit (None: it has none)."""
    parts = []
    for norm, index in g.norm_index.items():
        weight = getattr(modules[norm], "weight", None)
        if weight is None or not all(index):
            continue
        w = weight.detach().abs().double().cpu()
        parts.append(torch.stack([w[list(ix)].mean() for ix in index]))
    return torch.stack(parts).mean(0) if parts else None


class NetworkSlimming(ScoredMethod):
    """Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming".

    A channel's score is |γ|, the scale of the BatchNorm that normalises it (the mean over
    the group's normalisation layers when several normalise the same channels, e.g. the
    producers' norms of a residual stream). The paper first trains with the sparsity penalty
    ``λ Σ |γ|`` (:func:`gamma_l1_penalty`, λ = 1e-4 in its CIFAR runs) so that unimportant
    scales go to zero, then prunes globally. ``epochs`` > 0 runs that regularised training
    here, on the data given to :func:`mipp.prune` (SGD at ``lr``; counted as the method's
    extra training epochs in comparisons); ``epochs=0`` (the default) scores the model as it
    is, e.g. one trained with the penalty already. A model whose in-scope groups are not
    normalised by an affine BatchNorm / GroupNorm / LayerNorm is refused, naming them.
    """

    name = "slimming"
    summary = "|γ| of the unit's BatchNorm, after λΣ|γ| training (Liu et al. 2017)"
    default_allocation: Allocation = "global"
    needs_labels = False

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 0,
        penalty: float = 1e-4,
        lr: float = 0.01,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        gamma_l1_penalty(penalty)  # checks it
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.epochs, self.penalty, self.lr = epochs, float(penalty), float(lr)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "epochs": self.epochs, "penalty": self.penalty, "lr": self.lr}

    def extra_training_epochs(self) -> int:
        return self.epochs

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        out, missing = {}, []
        for g in ctx.groups:
            s = _norm_scores(g, modules)
            if s is None:
                missing.append(g.name)
            else:
                out[g.name] = s
        if missing:
            raise MippError(
                f"method 'slimming' scores the scale γ of each unit's normalisation layer; "
                f"group(s) {missing} have none (a model without BatchNorm cannot use it; "
                f"exclude them with exclude=[...] or pick another method)"
            )
        if self.epochs and "slimming_trained" not in ctx.cache:
            ctx.cache["slimming_trained"] = True
            self._train(ctx)
            return self.scores(ctx)
        return out

    def _train(self, ctx: PruneContext) -> None:
        from mipp.methods.baselines.regularised import training_data

        data = training_data(ctx, self.name)
        config = TrainConfig(epochs=self.epochs, lr=self.lr, seed=ctx.seed)
        device = first_parameter(ctx.model).device
        train(ctx.model, data, config, device=device, penalty=gamma_l1_penalty(self.penalty))
        ctx.model.eval()


# ----------------------------------------------------------------------------- CCP


def quadratic_greedy_scores(a: Tensor, s: Tensor, alive: Tensor) -> Tensor:
    """Greedy solution of CCP's 0-1 quadratic program → scores ``(units,)`` float64.

    The loss change of removing the set S is ΔL(S) = −Σ_{i∈S} a_i + ½ Σ_{i,j∈S} s_ij. The
    removed set grows one live unit at a time, each step adding the unit that gives the
    smallest ΔL (ties: the lowest index); the unit added at step k scores the running
    maximum of ΔL over steps 1..k, plus k·10⁻⁹·(1 + max |ΔL|) / units so that the greedy order
    is kept exactly. Units removed first score lowest; dead units score −inf-like (below
    every live one).
    """
    a, s = a.double().cpu(), s.double().cpu()
    u = len(a)
    remaining = alive.cpu().clone().to(torch.bool)
    cross = torch.zeros(u, dtype=torch.float64)  # Σ_{i ∈ S} s_ij
    value = 0.0
    order, values = [], []
    for _ in range(int(remaining.sum())):
        gain = -a + cross + 0.5 * s.diagonal()
        gain[~remaining] = torch.inf
        j = int(torch.argmin(gain))
        value += float(gain[j])
        cross += s[j]
        remaining[j] = False
        order.append(j)
        values.append(value)
    scores = torch.full((u,), -1.0, dtype=torch.float64)
    if not order:
        return scores
    v = torch.cummax(torch.tensor(values, dtype=torch.float64), 0).values
    spread = 1e-9 * (1.0 + float(v.abs().max())) / u
    scores[torch.tensor(order)] = v + torch.arange(1, len(order) + 1, dtype=torch.float64) * spread
    scores[~alive.cpu()] = float(scores[torch.tensor(order)].min()) - 1.0
    return scores


class CollaborativeChannelPruning(ScoredMethod):
    """Peng et al. 2019, "Collaborative Channel Pruning for Deep Networks" (CCP).

    Removing the set S of a layer's units sets their parameters W_S to zero; to second order
    the loss changes by ΔL(S) = −Σ_{i∈S} gᵢᵀwᵢ + ½ Σ_{i,j∈S} wᵢᵀ H_ij w_j. CCP approximates
    the Hessian by the outer product of first-order gradients, so with t_bi = g_b,iᵀ wᵢ (the
    gradient of calibration chunk b's mean loss along unit i's parameters, its weight rows
    and bias entries, every producer's)

        a_i = mean_b t_bi,        s_ij = mean_b t_bi t_bj,

    and picks S, a 0-1 quadratic program, per layer. The paper relaxes and solves it; here it
    is solved greedily (:func:`quadratic_greedy_scores`), which removes the units CCP's
    objective rates cheapest together — units that matter only jointly are kept together.
    Chunks are ``batch_size`` calibration samples, as the paper's minibatches. Needs labels;
    default allocation uniform (the paper prunes each layer by a set ratio).
    """

    name = "ccp"
    summary = "0-1 quadratic program on gradient-outer-product curvature (Peng et al. 2019)"
    default_allocation: Allocation = "uniform"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        from mipp.methods.baselines.gradient import loss_gradient

        ctx.require_labels(self.name)
        params = layer_parameters(ctx.model)
        modules = ctx.modules
        rows: dict[str, list[Tensor]] = {g.name: [] for g in ctx.groups}
        with _scoring(ctx.model, params):
            for chunk in ctx.batches():
                g = loss_gradient(ctx.model, [chunk], params)
                per = {id(p): gi * p.detach() for p, gi in zip(params, g, strict=True)}
                for grp in ctx.groups:
                    rows[grp.name].append(unit_sum(grp, modules, lambda t, per=per: per.get(id(t))))
        out = {}
        for grp in ctx.groups:
            t = torch.stack(rows[grp.name])  # (chunks, units)
            a, s = t.mean(0), t.T @ t / len(t)
            out[grp.name] = quadratic_greedy_scores(a, s, ctx.alive[grp.name])
        return out
