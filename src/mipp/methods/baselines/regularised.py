"""Methods that regularise during training, then prune: Structured Sparsity Learning (Wen et
al. 2016), Growing Regularization (Wang et al. 2021), Incremental Regularization (Wang et al.
2019), Trainability Preserving Pruning (Wang & Fu 2023) and Only Train Once (Chen et al.
2021), implemented from their papers.

Each trains the working copy for ``epochs`` epochs with its penalty added to the loss
(:func:`mipp.zoo.training.train`'s ``penalty``) on the data given to :func:`mipp.prune` (or
the labelled calibration set), then scores the units; the epochs are counted as the method's
extra training (``extra_training_epochs``), so a comparison can give every other method the
same budget. ``epochs=0`` scores the model as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.methods.base import PruneContext
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, _widths_for, unit_sum
from mipp.modules import first_parameter
from mipp.surgery.structure import UnitGroup
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import ImageDataset
from mipp.zoo.training import train

__all__ = [
    "GrowingRegularization",
    "IncrementalRegularization",
    "OnlyTrainOnce",
    "StructuredSparsity",
    "TrainabilityPreserving",
    "increg_increments",
    "tpp_penalty_value",
    "training_data",
    "unit_norms_squared",
]


def unit_norms_squared(group: UnitGroup, modules: dict[str, nn.Module]) -> Tensor:
    """Σ w² over each unit's own parameters (every producer's weight rows and bias entries),
    differentiable: ``(units,)`` in the parameters' dtype."""
    total = None
    for p in group.producers:
        module = modules[p]
        index = group.producer_index[p]
        idx = torch.tensor([c for ix in index for c in ix], dtype=torch.long)
        owner = torch.tensor([j for j, ix in enumerate(index) for _ in ix], dtype=torch.long)
        for param in (module.weight, module.bias):
            if param is None:
                continue
            rows = param.reshape(param.shape[0], -1).pow(2).sum(1)
            part = torch.zeros(group.size, dtype=rows.dtype, device=rows.device)
            part = part.index_add(0, owner.to(rows.device), rows[idx.to(rows.device)])
            total = part if total is None else total + part
    assert total is not None
    return total


def training_data(ctx: PruneContext, method: str) -> ImageDataset:
    """What a method that trains before pruning trains on: the dataset given to
    :func:`mipp.prune`, or else the labelled calibration set (one tensor run as model(x))."""
    if isinstance(ctx.data, ImageDataset):
        return ctx.data
    if ctx.labels is None or not isinstance(ctx.inputs.value, Tensor) or ctx.inputs.forward:
        raise MippError(
            f"method {method!r} trains with its penalty and needs labelled data run as "
            f"model(x): pass an ImageDataset or (inputs, labels)"
        )
    return ImageDataset(
        ctx.inputs.value.cpu(),
        ctx.labels.cpu(),
        num_classes=int(ctx.labels.max()) + 1,
        name="calibration",
    )


def _check(name: str, value: Any, *, low: float, integer: bool = False) -> None:
    kind = int if integer else int | float
    if not (isinstance(value, kind) and not isinstance(value, bool) and value >= low):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what} >= {low}, got {value!r}")


class _Regularised(ScoredMethod):
    """Train with :meth:`penalty` for ``epochs`` epochs (SGD at ``lr``), then score."""

    default_allocation: Allocation = "global"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 1,
        lr: float = 0.01,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        _check("epochs", epochs, low=0, integer=True)
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.epochs, self.lr = epochs, float(lr)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "epochs": self.epochs, "lr": self.lr}

    def extra_training_epochs(self) -> int:
        return self.epochs * self.rounds

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        raise NotImplementedError

    def unit_scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        if self.epochs:
            self._train(ctx)
        return self.unit_scores(ctx)

    def _train(self, ctx: PruneContext) -> None:
        data = training_data(ctx, self.name)
        config = TrainConfig(epochs=self.epochs, lr=self.lr, seed=ctx.seed)
        steps = self.epochs * -(-len(data) // config.batch_size)
        train(
            ctx.model,
            data,
            config,
            device=first_parameter(ctx.model).device,
            penalty=self.penalty(ctx, steps),
        )
        ctx.model.eval()


class StructuredSparsity(_Regularised):
    """Wen et al. 2016, "Learning Structured Sparsity in Deep Neural Networks" (SSL), filter-
    and neuron-wise.

    Training adds the group lasso ``λ Σ_g Σ_{j ∈ g} ‖W_j‖₂`` over every unit's parameters
    W_j (its weight rows and bias entries, every producer's), which drives whole units to
    zero; a unit then scores ‖W_j‖₂ and the smallest go (global ranking, raw norms: the
    penalty makes them comparable). ``penalty`` λ defaults to 1e-4 per unit norm.
    """

    name = "ssl"
    summary = "‖W_j‖₂ after group-lasso training λΣ‖W_j‖₂ (Wen et al. 2016, SSL)"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 1,
        lr: float = 0.01,
        penalty: float = 1e-4,
    ) -> None:
        super().__init__(
            allocation=allocation,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
            epochs=epochs,
            lr=lr,
        )
        _check("penalty", penalty, low=0)
        self.weight = float(penalty)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "penalty": self.weight}

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        groups, weight = ctx.groups, self.weight

        def group_lasso(model: nn.Module) -> Tensor:
            modules = dict(model.named_modules())
            # ‖W_j‖₂ with a tiny floor: the norm's gradient is undefined at a zeroed unit
            return weight * sum(
                (unit_norms_squared(g, modules) + 1e-24).sqrt().sum() for g in groups
            )

        return group_lasso

    def unit_scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        return {
            g.name: unit_norms_squared(g, modules).detach().double().cpu().sqrt()
            for g in ctx.groups
        }


class GrowingRegularization(_Regularised):
    """Wang et al. 2021, "Neural Pruning via Growing Regularization" (GReg-1).

    The units to prune are chosen once, at the start, by the L1 norm of their parameters,
    for the sparsity asked: uniformly per layer by default, as the paper (and IncReg and TPP,
    which inherit this) prune every layer by a set ratio — a global L1 ranking empties
    LeNet-5's conv1 at 70 % — or globally with ``allocation="global"``. Training then adds
    ``½ λ_t Σ_{j pruned} ‖W_j‖²`` with λ growing linearly from 0 by ``growth`` per step up
    to ``ceiling`` (the paper: δλ = 1e-4 every Ku iterations, up to 1), pushing exactly
    those units to zero before they are removed; the others train freely. Scores after
    training: ‖W_j‖₂, with the chosen units forced below every other
    (so the removal is the choice made at the start).
    """

    name = "greg"
    summary = "L1 choice, then ½λΣ‖W_j‖² on it with λ growing (Wang et al. 2021, GReg)"
    #: the paper prunes every layer by a set ratio (as L1), so its L1 choice is per layer
    default_allocation: Allocation = "uniform"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 1,
        lr: float = 0.01,
        growth: float = 1e-3,
        ceiling: float = 1.0,
    ) -> None:
        super().__init__(
            allocation=allocation,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
            epochs=epochs,
            lr=lr,
        )
        _check("growth", growth, low=0)
        _check("ceiling", ceiling, low=0)
        self.growth, self.ceiling = float(growth), float(ceiling)
        self._chosen: dict[str, Tensor] | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "growth": self.growth, "ceiling": self.ceiling}

    def decide(self, ctx: PruneContext, budget):  # type: ignore[no-untyped-def]
        from mipp.methods.allocation import allocate

        names = [g.name for g in ctx.groups]
        modules = ctx.modules
        l1 = [unit_sum(g, modules, lambda p: p.detach().abs()) for g in ctx.groups]
        keep = _widths_for(ctx.groups, budget.widths) if self.allocation == "widths" else None
        removed, _ = allocate(
            l1,
            [ctx.alive[n] for n in names],
            names=names,
            method=self.name,
            mode=self.allocation,
            keep=keep,
            sparsity=budget.sparsity,
            target=budget.target,
            measure=lambda masks: ctx.measure(dict(zip(names, masks, strict=True))),
            normalize="mean",
            tolerance=budget.tolerance,
        )
        self._chosen = dict(zip(names, removed, strict=True))
        return super().decide(ctx, budget)

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        chosen = self._chosen or {}
        groups = [g for g in ctx.groups if g.name in chosen and bool(chosen[g.name].any())]
        state = {"step": 0}
        growth, ceiling = self.growth, self.ceiling

        def growing(model: nn.Module) -> Tensor:
            lam = min(ceiling, growth * state["step"])
            state["step"] += 1
            modules = dict(model.named_modules())
            device = first_parameter(model).device
            total = sum(
                unit_norms_squared(g, modules)[chosen[g.name].to(device)].sum() for g in groups
            )
            return 0.5 * lam * total if groups else torch.zeros(())

        return growing

    def unit_scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        out = {}
        for g in ctx.groups:
            norm = unit_norms_squared(g, modules).detach().double().cpu().sqrt()
            chosen = (self._chosen or {}).get(g.name)
            if chosen is not None:
                norm = torch.where(chosen, norm - 1e12, norm)
            out[g.name] = norm
        return out


def increg_increments(ranks: Tensor, size: int, pruned: int, step: float) -> Tensor:
    """IncReg's increment Δλ(r) for units of ascending-importance rank ``r`` (0 = least
    important) in a layer of ``size`` units of which ``pruned`` (= R·N) are to go:

        Δλ(r) = A (1 − r / RN)                 for r < RN
        Δλ(r) = −A (r − RN + 1) / (N − RN)     for r ≥ RN

    (A = ``step``): the least important unit gains A per update, the increment falls
    linearly to 0 at the pruning boundary, and the units that stay are relieved, the most
    important by A. With ``pruned = 0`` every increment is ≤ 0 (nothing is pushed).
    """
    r = ranks.double()
    rn = float(pruned)
    up = step * (1 - r / rn) if pruned > 0 else torch.zeros_like(r)
    rest = max(size - pruned, 1)
    down = -step * (r - rn + 1) / rest
    return torch.where(r < rn, up, down)


class IncrementalRegularization(GrowingRegularization):
    """Wang, Zhang, Wang & Hu 2019, "Structured Pruning for Efficient ConvNets via
    Incremental Regularization" (IncReg).

    Every unit j carries its own factor λ_j (start 0); training adds ``½ Σ_j λ_j ‖W_j‖²``.
    Before every step the units of each group are ranked by the L1 norm of their parameters
    (ascending: rank 0 is the least important) and each λ_j moves by
    :func:`increg_increments` — up by as much as ``step`` for the units below the layer's
    pruning boundary RN, down for the others — clipped to ``[0, ceiling]``. Ranks are re-taken
    every step, so a unit can escape the pruned set while it is being pushed (what sets IncReg
    apart from GReg's fixed choice). The per-layer counts RN come from the L1 allocation of
    the budget at the start (as :class:`GrowingRegularization` chooses; uniform: the paper's
    per-layer ratio R). After training the RN units of each group with the largest λ
    (ties: smallest norm) are removed; scores are the norms ‖W_j‖₂, those units forced
    below every other. The paper's defaults are a Caffe schedule in iterations; here A
    (``step``) and the ceiling are per optimiser step (defaults 1e-3 and 1, GReg's).
    """

    name = "increg"
    summary = "L2 factors that grow or shrink with each unit's L1 rank (Wang et al. 2019, IncReg)"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 1,
        lr: float = 0.01,
        step: float = 1e-3,
        ceiling: float = 1.0,
    ) -> None:
        super().__init__(
            allocation=allocation,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
            epochs=epochs,
            lr=lr,
            growth=step,
            ceiling=ceiling,
        )
        self.factors: dict[str, Tensor] = {}

    def options(self) -> dict[str, Any]:
        out = super().options()
        out["step"] = out.pop("growth")
        return out

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        chosen = self._chosen or {}
        counts = {g.name: int(chosen[g.name].sum()) if g.name in chosen else 0 for g in ctx.groups}
        groups = [g for g in ctx.groups if counts[g.name] > 0]
        self.factors = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        step, ceiling = self.growth, self.ceiling

        def incremental(model: nn.Module) -> Tensor:
            modules = dict(model.named_modules())
            device = first_parameter(model).device
            total = torch.zeros((), device=device)
            for g in groups:
                with torch.no_grad():
                    l1 = unit_sum(g, modules, lambda p: p.detach().abs()).double().cpu()
                    ranks = torch.empty(g.size, dtype=torch.float64)
                    ranks[torch.argsort(l1, stable=True)] = torch.arange(
                        g.size, dtype=torch.float64
                    )
                    lam = self.factors[g.name]
                    lam.add_(increg_increments(ranks, g.size, counts[g.name], step))
                    lam.clamp_(0.0, ceiling)
                sq = unit_norms_squared(g, modules)
                total = total + 0.5 * (lam.to(device=device, dtype=sq.dtype) * sq).sum()
            return total

        return incremental

    def unit_scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        chosen = self._chosen or {}
        out = {}
        for g in ctx.groups:
            norm = unit_norms_squared(g, modules).detach().double().cpu().sqrt()
            count = int(chosen[g.name].sum()) if g.name in chosen else 0
            lam = self.factors.get(g.name)
            if count and lam is not None:
                # largest λ first, ties by the smaller norm
                order = sorted(range(g.size), key=lambda j: (-float(lam[j]), float(norm[j])))
                pushed = torch.zeros(g.size, dtype=torch.bool)
                pushed[order[:count]] = True
                norm = torch.where(pushed, norm - 1e12, norm)
            elif count:  # no training: the L1 choice made at the start
                norm = torch.where(chosen[g.name], norm - 1e12, norm)
            out[g.name] = norm
        return out


def tpp_penalty_value(group: UnitGroup, modules: dict[str, nn.Module], chosen: Tensor) -> Tensor:
    """Σ over the group's producers of ‖(W Wᵀ) ⊙ (1 − k kᵀ)‖²_F, k the rows of kept units
    (every Gram entry that involves a unit to prune), plus Σ (γ² + β²) of those units'
    channels in the group's normalisation layers."""
    total = None
    for p in group.producers:
        module = modules[p]
        rows = module.weight.reshape(module.weight.shape[0], -1)
        kept = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        for j, ix in enumerate(group.producer_index[p]):
            if bool(chosen[j]):
                kept[list(ix)] = False
        gram = rows @ rows.T
        outside = ~(kept[:, None] & kept[None, :])
        part = gram[outside].pow(2).sum()
        total = part if total is None else total + part
    for norm, index in group.norm_index.items():
        m = modules[norm]
        chans = [c for j, ix in enumerate(index) if bool(chosen[j]) for c in ix]
        for param in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if param is not None and chans:
                total = total + param[chans].pow(2).sum()
    assert total is not None
    return total


class TrainabilityPreserving(GrowingRegularization):
    """Wang & Fu 2023, "Trainability Preserving Neural Pruning" (TPP).

    As :class:`GrowingRegularization`, the units to prune are the L1 choice made at the
    start and a coefficient λ_t grows during training (by ``growth`` per step up to
    ``ceiling``); the penalty is TPP's: ``½ λ_t [Σ ‖(W Wᵀ) ⊙ (1 − k kᵀ)‖²_F + Σ (γ² + β²)]``
    per layer (:func:`tpp_penalty_value`) — every Gram-matrix entry that involves a filter to
    prune, so those filters are driven to zero *and* decorrelated from the kept ones, whose
    own Gram block is left free (their trainability is what it protects) — plus the pruned
    channels' BatchNorm scale and shift. Then exactly the chosen units go.
    """

    name = "tpp"
    summary = "L1 choice decorrelated from kept filters, growing Gram penalty (Wang & Fu 2023)"

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        chosen = self._chosen or {}
        groups = [g for g in ctx.groups if g.name in chosen and bool(chosen[g.name].any())]
        state = {"step": 0}
        growth, ceiling = self.growth, self.ceiling

        def gram(model: nn.Module) -> Tensor:
            lam = min(ceiling, growth * state["step"])
            state["step"] += 1
            modules = dict(model.named_modules())
            if not groups:
                return torch.zeros((), device=first_parameter(model).device)
            total = sum(tpp_penalty_value(g, modules, chosen[g.name]) for g in groups)
            return 0.5 * lam * total

        return gram


def _group_tensors(group: UnitGroup, modules: dict[str, nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, unit of each of its dim-0 entries or -1) for every tensor of a zero-invariant
    group: the producers' weights and biases and the group's norms' scales and shifts."""
    out = []
    for p in group.producers:
        module = modules[p]
        owner = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
        for j, ix in enumerate(group.producer_index[p]):
            owner[list(ix)] = j
        out += [(t, owner) for t in (module.weight, module.bias) if t is not None]
    for norm, index in group.norm_index.items():
        m = modules[norm]
        weight = getattr(m, "weight", None)
        if weight is None:
            continue
        owner = torch.full((weight.shape[0],), -1, dtype=torch.long)
        for j, ix in enumerate(index):
            owner[list(ix)] = j
        out += [(t, owner) for t in (weight, getattr(m, "bias", None)) if t is not None]
    return out


def _zig_norms(group: UnitGroup, modules: dict[str, nn.Module]) -> Tensor:
    """‖x_g‖₂ of each unit's zero-invariant group (float64, CPU, detached)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for t, owner in _group_tensors(group, modules):
        rows = t.detach().reshape(t.shape[0], -1).double().pow(2).sum(1).cpu()
        keep = owner >= 0
        total.index_add_(0, owner[keep], rows[keep])
    return total.sqrt()


class OnlyTrainOnce(_Regularised):
    """Chen et al. 2021, "Only Train Once: A One-Shot Neural Network Training And Pruning
    Framework" (OTO): zero-invariant groups trained by the Half-Space Projected Gradient.

    A unit's zero-invariant group x_g is everything that must vanish with it: its producers'
    weight rows and bias entries and its normalisation layers' scale and shift. Training
    minimises f + λ Σ_g ‖x_g‖₂. The first ``warmup`` epochs are plain (sub)gradient steps
    (the paper's stage 1); in the remaining ``epochs − warmup`` each step is followed by the
    half-space projection (stage 2): a group whose new value x̃_g points into the half-space
    x̃_gᵀ x_g < ε ‖x_g‖² of its value x_g before the step is set to zero, and a zero group
    stays zero. Units score ‖x_g‖₂ after training (the zero groups lowest), ranked globally;
    OTO itself removes exactly the zero groups, which is the ranking's choice whenever
    enough groups reach zero. Needs labels.
    """

    name = "oto"
    summary = "‖x_g‖ after half-space projected gradient training (Chen et al. 2021, OTO)"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
        epochs: int = 2,
        warmup: int = 1,
        lr: float = 0.01,
        penalty: float = 1e-3,
        epsilon: float = 0.0,
    ) -> None:
        super().__init__(
            allocation=allocation,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
            epochs=epochs,
            lr=lr,
        )
        _check("warmup", warmup, low=0, integer=True)
        if warmup > epochs:
            raise ValueError(f"warmup ({warmup}) must not exceed epochs ({epochs})")
        _check("penalty", penalty, low=0)
        if not (isinstance(epsilon, int | float) and not isinstance(epsilon, bool)):
            raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
        if not 0 <= epsilon < 1:
            raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
        self.warmup, self.weight, self.epsilon = warmup, float(penalty), float(epsilon)

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "warmup": self.warmup,
            "penalty": self.weight,
            "epsilon": self.epsilon,
        }

    def penalty(self, ctx: PruneContext, steps: int) -> Callable[[nn.Module], Tensor]:
        groups, weight = ctx.groups, self.weight

        def group_lasso(model: nn.Module) -> Tensor:
            modules = dict(model.named_modules())
            total = 0
            for g in groups:
                sq = None
                for t, owner in _group_tensors(g, modules):
                    rows = t.reshape(t.shape[0], -1).pow(2).sum(1)
                    keep = (owner >= 0).to(rows.device)
                    part = torch.zeros(g.size, dtype=rows.dtype, device=rows.device)
                    part = part.index_add(0, owner[owner >= 0].to(rows.device), rows[keep])
                    sq = part if sq is None else sq + part
                if sq is not None:
                    total = total + (sq + 1e-24).sqrt().sum()
            return weight * total

        return group_lasso

    def half_space(self, ctx: PruneContext) -> Callable[[nn.Module], None]:
        """The stage-2 projection, run after every optimizer step (``train(after_step=)``)."""
        eps = self.epsilon
        groups = ctx.groups

        def snapshot(model: nn.Module) -> list[list[Tensor]]:
            modules = dict(model.named_modules())
            return [[t.detach().clone() for t, _ in _group_tensors(g, modules)] for g in groups]

        state = {"before": snapshot(ctx.model)}

        def project(model: nn.Module) -> None:
            modules = dict(model.named_modules())
            for g, before in zip(groups, state["before"], strict=True):
                tensors = _group_tensors(g, modules)
                dot = torch.zeros(g.size, dtype=torch.float64)
                sq = torch.zeros(g.size, dtype=torch.float64)
                for (t, owner), old in zip(tensors, before, strict=True):
                    keep = owner >= 0
                    new_rows = t.reshape(t.shape[0], -1).double().cpu()
                    old_rows = old.reshape(old.shape[0], -1).double().cpu()
                    dot.index_add_(0, owner[keep], (new_rows * old_rows).sum(1)[keep])
                    sq.index_add_(0, owner[keep], old_rows.pow(2).sum(1)[keep])
                zero = (sq == 0) | (dot < eps * sq)
                for t, owner in tensors:
                    rows = zero[owner.clamp_min(0)] & (owner >= 0)
                    t[rows.to(t.device)] = 0
            state["before"] = snapshot(model)

        return project

    def _train(self, ctx: PruneContext) -> None:
        warm, rest = self.warmup, self.epochs - self.warmup
        if warm:
            self.epochs = warm
            try:
                super()._train(ctx)
            finally:
                self.epochs = warm + rest
        if rest:
            self._stage2(ctx, rest)

    def _stage2(self, ctx: PruneContext, epochs: int) -> None:
        data = training_data(ctx, self.name)
        config = TrainConfig(epochs=epochs, lr=self.lr, seed=ctx.seed + 1)
        train(
            ctx.model,
            data,
            config,
            device=first_parameter(ctx.model).device,
            penalty=self.penalty(ctx, 0),
            after_step=self.half_space(ctx),
        )
        ctx.model.eval()

    def unit_scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        return {g.name: _zig_norms(g, modules) for g in ctx.groups}
