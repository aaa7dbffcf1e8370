"""Data-free baselines: random scores and the L1 norm of each filter (Li et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.methods.base import PruneContext
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, unit_sum
from mipp.modules import first_parameter
from mipp.zoo.config import TrainConfig
from mipp.zoo.data import ImageDataset
from mipp.zoo.training import train

__all__ = ["L1Norm", "RandomScores"]


class RandomScores(ScoredMethod):
    """Uniform random scores, seeded by ``seed`` (and the round): the floor any method must beat.

    Default allocation: global (with random scores, every unit is equally likely to go).
    """

    name = "random"
    summary = "uniform random scores, seeded: the floor any method must beat"
    default_allocation: Allocation = "global"

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
        # the round counter lives in the run's context: the same instance gives the same
        # masks for the same seed in every prune() call
        state = ctx.cache.setdefault(self.name, {"round": 0})
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + state["round"])
        state["round"] += 1
        return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in ctx.groups}


class L1Norm(ScoredMethod):
    """Li et al. 2017, "Pruning Filters for Efficient ConvNets": s_j = Σ |w| over unit j's filter.

    The unit's parameters are its producers' weight rows (a conv filter, a neuron's incoming
    weights); biases are not part of the norm, as in the paper. The paper prunes a fixed
    share per layer (uniform), which is the default; ``allocation="global"`` ranks
    mean-normalised norms across layers.
    """

    name = "l1"
    summary = "Σ|w| over the unit's filter (Li et al. 2017, Pruning Filters for Efficient ConvNets)"
    default_allocation: Allocation = "uniform"

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        modules = ctx.modules
        return {
            g.name: unit_sum(g, modules, lambda p, m=modules: p.abs() if p.ndim > 1 else None)
            for g in ctx.groups
        }


class IMP(L1Norm):
    """Structured iterative magnitude pruning: prune by L1, re-train, repeat.

    ``rounds`` prune steps follow the exponential schedule of the driver; after every step
    but the last the masked network is re-trained by ``retrain(model)`` — by default
    :func:`mipp.zoo.training.train` for ``epochs`` epochs of SGD at ``lr`` on the data passed to
    :func:`mipp.pipeline` (which must then carry labels). Removed units are masked with zero
    weights on both sides, which training cannot revive. Scores are the L1 norms of the
    re-trained filters; allocation is global, as in Frankle & Carbin's IMP.
    """

    name = "imp"
    summary = "structured iterative magnitude pruning: L1, re-train, repeat (Frankle & Carbin 2019)"
    default_allocation: Allocation = "global"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 3,
        retrain: Callable[[nn.Module], None] | None = None,
        epochs: int = 1,
        lr: float = 0.01,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        if not (isinstance(lr, int | float) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.retrain, self.epochs, self.lr = retrain, epochs, lr

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "retrain": "callback" if self.retrain is not None else "train",
            "epochs": self.epochs,
            "lr": self.lr,
        }

    def extra_training_epochs(self) -> int:
        """``epochs`` of re-training after every round but the last (with the default
        re-training; a ``retrain`` callback's own budget is unknown, counted as 0)."""
        return 0 if self.retrain is not None else (self.rounds - 1) * self.epochs

    def after_round(self, ctx: PruneContext, round: int) -> None:
        if self.retrain is not None:
            self.retrain(ctx.model)
            return
        data = ctx.data
        if not isinstance(data, ImageDataset):
            if ctx.labels is None:
                raise MippError(
                    "method 'imp' re-trains between rounds and needs labelled data: pass an "
                    "ImageDataset or (inputs, labels), or give IMP(retrain=callback)"
                )
            x = ctx.inputs
            if not isinstance(x.value, Tensor) or x.forward is not None:
                raise MippError(
                    f"method 'imp' re-trains with mipp's training loop, which runs model(x) on "
                    f"one input tensor; the calibration data has {x.describe()}"
                    + (" and forward=" if x.forward is not None else "")
                    + ": give IMP(retrain=callback)"
                )
            data = ImageDataset(
                x.value.cpu(),
                ctx.labels.cpu(),
                num_classes=int(ctx.labels.max()) + 1,
                name="calibration",
            )
        config = TrainConfig(epochs=self.epochs, lr=self.lr, seed=ctx.seed + round)
        device = first_parameter(ctx.model).device
        train(ctx.model, data, config, device=device)
