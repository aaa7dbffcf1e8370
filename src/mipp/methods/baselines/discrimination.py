"""Discrimination-aware Channel Pruning (Zhuang et al. 2018), structured on mipp's units.

DCP chooses a layer's input channels by a greedy search on a joint loss: the reconstruction
error of the layer's output (as ThiNet and Channel Pruning) plus a discrimination-aware loss,
the cross-entropy of an auxiliary classifier placed on the features. Each step adds to the
selected set A the channel whose gradient of the joint loss is largest, then re-optimises
the selected channels' weights on A.

Here a unit j of group g scales its contribution to g's consumers by β_j (β = 1: the
original network). With the sampled contributions X̂ ``(m, units)`` and outputs ŷ = X̂·1 of
:class:`~mipp.methods.baselines.thinet.ThiNet` (``samples_per_image`` entries per image,
at most ``images`` images), the joint loss is

    L(β) = M(β) + λ L_S(β),
    M(β) = ‖ŷ − X̂β‖² / (2‖ŷ‖²)                         (relative reconstruction error)
    L_S(β) = (1/n) Σ_i CE(V (β ⊙ z_i) + c, y_i)          (discrimination-aware loss)

z_i ``(units,)`` is the spatial mean of each unit's activation on image i (the unit's inputs
to its first consumer), and (V, c) the auxiliary softmax classifier on z, fitted to the
labels of the calibration set on the original features (multinomial logistic regression,
L-BFGS in float64, ridge ``1e-4``). Greedy selection (the paper's Algorithm 1): A starts
empty with β = 0; each step picks j ∉ A maximising |∂L/∂β_j|, then re-fits β_A to the
reconstruction, β_A = argmin M (the least-squares solution from the moments X̂ᵀX̂ and X̂ᵀŷ;
a tiny ridge keeps it defined), until every live unit is selected. Unit j's score is
1 − t_j / units for the step t_j at which it joined (earlier = more important), so the
uniform allocation keeps exactly DCP's first choices. After the decision the kept units'
consumer weights are re-fitted as in ThiNet (``refit``).

What differs from the paper, stated plainly: every pruned layer is its own stage (the paper
inserts a few auxiliary losses and uses the one closing each stage); the auxiliary
classifier is a linear probe on the pooled features of the pruned layer, fitted on the
calibration set instead of trained during the paper's discrimination-aware fine-tuning
(mipp gives every method the same fine-tuning afterwards); a unit's weights are re-fitted
through one scale per unit β_j, by least squares on M rather than SGD on M + λL_S, and the
selection uses the gradient with respect to that scale, not the Frobenius norm of the
gradient over the unit's whole weight block. Needs labels; default allocation uniform (the
paper prunes every layer by the same rate).

>>> import torch
>>> from torch import nn
>>> import mipp
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(),
...                     nn.Linear(48, 3))
>>> x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 3
>>> result = mipp.prune(net, (x, y), method="dcp", sparsity=0.5)
>>> [g.width_after for g in result.report.groups]
[1, 2]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mipp.errors import MippError
from mipp.methods.base import PruneContext
from mipp.methods.baselines.thinet import ThiNet
from mipp.methods.scored import Allocation, Normalize
from mipp.surgery.capture import capture_inputs
from mipp.surgery.structure import UnitGroup

__all__ = ["DiscriminationAware", "dcp_order", "fit_probe", "pooled_unit_features"]


def pooled_unit_features(x: Tensor, index: tuple[tuple[int, ...], ...]) -> Tensor:
    """z ``(b, units)`` float64: the mean of each unit's inputs ``index[j]`` of a layer input
    ``x`` ``(b, C, ...)`` (a conv's channels: over their positions too; a Linear's features)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).double().mean(-1)  # (b, C)
    idx = torch.tensor([i for ix in index for i in ix], dtype=torch.long)
    owner = torch.tensor([j for j, ix in enumerate(index) for _ in ix], dtype=torch.long)
    sums = torch.zeros(x.shape[0], len(index), dtype=torch.float64)
    sums.index_add_(1, owner, flat[:, idx].cpu())
    counts = torch.bincount(owner, minlength=len(index)).clamp_min(1).double()
    return sums / counts


def fit_probe(z: Tensor, y: Tensor, classes: int, *, ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression of labels ``y`` ``(n,)`` on ``z`` ``(n, d)``:
    argmin_{U, c} (1/n) Σ_i CE(U z_i / s + c, y_i) + ridge ‖U‖²/2 with s = max |z| (the
    features' scale), by L-BFGS in float64 — a strictly convex problem, so the answer does
    not depend on the start → V = U / s ``(classes, d)`` and c, the logits being V z + c."""
    z, y = z.double(), y.long()
    weight = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    scale = z.abs().max().clamp_min(1e-12)
    opt = torch.optim.LBFGS(
        [weight, bias],
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy((z / scale) @ weight.T + bias, y)
        loss = loss + 0.5 * ridge * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (weight / scale).detach(), bias.detach()


def dcp_order(
    contributions: Tensor,
    z: Tensor,
    y: Tensor,
    probe: tuple[Tensor, Tensor],
    alive: Tensor,
    *,
    weight: float = 1.0,
) -> Tensor:
    """DCP's greedy selection order of the live units (see the module docstring) → unit
    indices ``(live,)``, the first selected first.

    ``contributions``: X̂ ``(m, units)``; ``z``: ``(n, units)`` pooled features with labels
    ``y`` ``(n,)``; ``probe``: (V, c) of :func:`fit_probe`; ``weight``: λ. Ties: lowest index.
    """
    x = contributions.double()
    target = x.sum(1)
    yy = float(target @ target)
    yy = yy if yy > 0 else 1.0
    gram = x.T @ x / yy
    b = x.T @ target / yy
    v, c = (t.double() for t in probe)
    z, onehot = z.double(), F.one_hot(y.long(), v.shape[0]).double()
    n = len(z)
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    remaining = alive.clone().to(torch.bool)
    chosen: list[int] = []
    eye_scale = 1e-10 * float(gram.diagonal().mean().clamp_min(1e-300))
    for _ in range(int(remaining.sum())):
        grad = gram @ beta - b  # ∂M/∂β
        if weight:
            p = torch.softmax((z * beta) @ v.T + c, dim=1)
            grad = grad + weight * (z * ((p - onehot) @ v)).sum(0) / n  # ∂L_S/∂β
        score = grad.abs()
        score[~remaining] = -1.0
        j = int(torch.argmax(score))
        chosen.append(j)
        remaining[j] = False
        a = torch.tensor(chosen, dtype=torch.long)
        g_aa = gram[a][:, a] + eye_scale * torch.eye(len(a), dtype=torch.float64)
        beta = torch.zeros_like(beta)
        beta[a] = torch.linalg.solve(g_aa, b[a])
    return torch.tensor(chosen, dtype=torch.long)


class DiscriminationAware(ThiNet):
    """Zhuang et al. 2018, "Discrimination-aware Channel Pruning for Deep Neural Networks"
    (DCP): greedy selection on reconstruction + auxiliary cross-entropy, then LS re-fit.

    See the module docstring for the maths and for what differs from the paper. Options:
    ``weight`` λ of the discrimination-aware loss (1.0), ``samples_per_image`` / ``images``
    as in :class:`ThiNet` (the sampled outputs of the reconstruction term; the auxiliary
    classifier sees the same ``images``), ``refit`` (True) the least-squares re-fit of the
    kept units' consumer weights. Needs labels.
    """

    name = "dcp"
    summary = "greedy on reconstruction + auxiliary CE gradient, LS re-fit (Zhuang et al. 2018)"
    default_allocation: Allocation = "uniform"
    needs_labels = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        weight: float = 1.0,
        samples_per_image: int = 10,
        images: int = 256,
        refit: bool = True,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation,
            samples_per_image=samples_per_image,
            images=images,
            refit=refit,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
        )
        if not (isinstance(weight, int | float) and not isinstance(weight, bool) and weight >= 0):
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "weight": self.weight}

    def features(self, ctx: PruneContext, groups: list[UnitGroup]) -> dict[str, Tensor]:
        """z ``(n, units)`` per group: :func:`pooled_unit_features` at the group's first
        consumer, on the first ``images`` calibration samples."""
        modules = ctx.modules
        first = {g.name: g.consumers[0] for g in groups if g.consumers}
        missing = [g.name for g in groups if not g.consumers]
        if missing:
            raise MippError(f"DCP needs a consumer layer for every group; {missing} have none")
        layers = {c.layer: modules[c.layer] for c in first.values()}
        readers: dict[str, list[str]] = {}
        for name, c in first.items():
            readers.setdefault(c.layer, []).append(name)
        index = {name: c.index for name, c in first.items()}

        def reduce(layer: str, x: Tensor) -> Tensor:
            return torch.cat([pooled_unit_features(x, index[n]) for n in readers[layer]], 1)

        batches = (x for x, _ in ctx.batches(self.images))
        got = capture_inputs(ctx.model, batches, layers, reduce, pieces=True)  # per sample
        out: dict[str, Tensor] = {}
        for layer, names in readers.items():
            parts = got[layer].split([len(index[n]) for n in names], dim=1)
            out.update(zip(names, parts, strict=True))
        return out

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        labels = ctx.require_labels(self.name)
        rows = self.scored_contributions(ctx)
        feats = self.features(ctx, ctx.groups)
        out = {}
        for g in ctx.groups:
            z = feats[g.name]
            y = labels[: len(z)].cpu()
            classes = int(y.max()) + 1
            probe = fit_probe(z, y, classes)
            x = torch.cat([part for _, part in rows[g.name]])
            order = dcp_order(x, z, y, probe, ctx.alive[g.name].cpu(), weight=self.weight)
            score = torch.zeros(g.size, dtype=torch.float64)
            score[order] = 1 - torch.arange(len(order), dtype=torch.float64) / g.size
            out[g.name] = score
        return out
