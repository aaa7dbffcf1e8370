"""Activation-based baselines: HRank, CHIP, mean activation and APoZ.

Each scores a unit from its *activation maps* on the calibration inputs. The map of a unit is
what the group's **first consumer** (``group.consumers[0]``, in forward order) reads for it:
the unit's output after BatchNorm, the nonlinearity and any pooling in between — the
activation the next layer actually sees. :func:`~mipp.methods.scored.unit_maps` turns that
raw input into per-unit maps ``(n, units, h, w)``: a conv channel's ``(h, w)`` map, a
flattened channel's square map for a Linear after ``flatten``, a ``(1, 1)`` map for a neuron.

Everything is computed batch by batch inside the ``reduce`` callback of
:func:`mipp.surgery.capture.capture_inputs`, which keeps only a per-(sample, unit) statistic
``(n, units)``; full maps are never stored for the whole calibration set. The unit score is
the mean of that statistic over the images. Units already removed (masked) have all-zero
maps and score 0 under every method here.

>>> import torch
>>> from torch import nn
>>> import mipp
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
>>> result = mipp.prune(net, torch.randn(16, 1, 8, 8), method="hrank", sparsity=0.5)
>>> result.report.achieved["units"]
0.5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mipp.methods.base import PruneContext
from mipp.methods.scored import Allocation, Normalize, ScoredMethod, unit_maps
from mipp.surgery.capture import capture_inputs
from mipp.surgery.structure import UnitGroup

__all__ = ["CHIP", "APoZ", "HRank", "MeanActivation", "channel_independence"]

#: elements (float64) one batched SVD call of CHIP may hold: 2**22 = 32 MiB
_CHIP_BUDGET = 2**22


def _check_samples(samples: Any) -> int:
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    return samples


def unit_statistic(
    ctx: PruneContext, stat: Callable[[Tensor], Tensor], samples: int | None = None
) -> dict[str, Tensor]:
    """Mean over images of ``stat(maps)`` for every group → ``{name: (size,)}`` float64.

    ``stat`` maps one batch of a group's unit maps ``(b, units, h, w)`` to a per-(sample,
    unit) statistic ``(b, units)``; it runs inside the capture hook. The maps are read at
    each group's first consumer on the first ``samples`` calibration inputs (default all).
    """
    modules = ctx.modules
    by_layer: dict[str, list[UnitGroup]] = {}
    for g in ctx.groups:
        by_layer.setdefault(g.consumers[0].layer, []).append(g)

    def reduce(layer: str, raw: Tensor) -> Tensor:
        parts = [stat(unit_maps(raw, g.consumers[0])).double() for g in by_layer[layer]]
        return torch.cat(parts, dim=1)

    got = capture_inputs(
        ctx.model,
        (x for x, _ in ctx.batches(samples)),
        {layer: modules[layer] for layer in by_layer},
        reduce,
        pieces=True,  # one statistic per sample: the same in pieces
    )
    out: dict[str, Tensor] = {}
    for layer, groups in by_layer.items():
        mean = got[layer].mean(0)
        for g, part in zip(groups, mean.split([g.size for g in groups]), strict=True):
            out[g.name] = part.clone()
    return out


def _map_ranks(maps: Tensor) -> Tensor:
    """Rank of each ``(h, w)`` map: ``(b, units, h, w)`` → ``(b, units)``."""
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    return torch.linalg.matrix_rank(maps)


def channel_independence(a: Tensor, *, budget: int = _CHIP_BUDGET) -> Tensor:
    """CHIP's channel independence of every row of every feature matrix.

    ``a``: ``(b, units, p)`` — per image, the layer's feature matrix A (one row per unit, its
    flattened map of p positions). Returns ``(b, units)`` float64 with

        CI(j) = ‖A‖_* − ‖A with row j zeroed‖_*        (Sui et al. 2021)

    (‖·‖_* the nuclear norm, the sum of singular values; CI ≥ 0 by interlacing). When
    p > units, A is first replaced by Rᵀ from the reduced QR decomposition Aᵀ = QR: A = RᵀQᵀ
    with Q orthonormal, so both A and every A with a row zeroed (= D·RᵀQᵀ) keep their
    singular values while the matrices shrink to ``(units, units)``. The ``units`` masked
    copies per image go through batched ``torch.linalg.svdvals`` in chunks of at most
    ``budget`` elements.
    """
    a = a.double()
    b, u, p = a.shape
    if p > u:
        a = torch.linalg.qr(a.transpose(1, 2), mode="r").R.transpose(1, 2)  # (b, u, u)
    full = torch.linalg.svdvals(a).sum(-1)  # (b,)
    img = torch.arange(b, device=a.device).repeat_interleave(u)
    row = torch.arange(u, device=a.device).repeat(b)
    ci = torch.empty(b * u, dtype=torch.float64, device=a.device)
    chunk = max(1, budget // (u * a.shape[2]))
    for s in range(0, b * u, chunk):
        ii, jj = img[s : s + chunk], row[s : s + chunk]
        mats = a[ii].clone()
        mats[torch.arange(len(ii), device=a.device), jj] = 0
        ci[s : s + chunk] = full[ii] - torch.linalg.svdvals(mats).sum(-1)
    return ci.reshape(b, u)


class _Sampled(ScoredMethod):
    """A method that reads the maps of the first ``samples`` calibration images (HRank, CHIP)."""

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        samples: int = 128,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        self.samples = _check_samples(samples)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "samples": self.samples}


class HRank(_Sampled):
    """Lin et al. 2020, "HRank: Filter Pruning using High-Rank Feature Map".

    s_j = (1/N) Σ_i rank(M_ij), the mean matrix rank (``torch.linalg.matrix_rank`` with its
    default tolerance, in float32 as in the paper's code) of unit j's ``(h, w)`` map M_ij
    over the first ``samples`` calibration images. Maps are read at the group's
    first consumer (see the module docstring); a neuron's ``(1, 1)`` map has rank 0 or 1.
    The paper prunes a fixed share per layer: default allocation uniform.
    """

    name = "hrank"
    summary = "mean matrix rank of the unit's feature maps (Lin et al. 2020, HRank)"
    default_allocation: Allocation = "uniform"

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        return unit_statistic(ctx, _map_ranks, self.samples)


class CHIP(_Sampled):
    """Sui et al. 2021, "CHIP: CHannel Independence-based Pruning".

    Per image i, A_i ``(units, h·w)`` stacks the flattened maps of the group's units (read
    at the first consumer); s_j = (1/N) Σ_i (‖A_i‖_* − ‖A_i with row j zeroed‖_*) over the
    first ``samples`` images (see :func:`channel_independence`, computed in float64). A unit
    whose map is zero, or a duplicate of others', adds little to the nuclear norm and scores
    low. The paper prunes a fixed share per layer: default allocation uniform.
    """

    name = "chip"
    summary = "nuclear-norm drop without the unit's map (Sui et al. 2021, CHIP)"
    default_allocation: Allocation = "uniform"

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        return unit_statistic(ctx, lambda maps: channel_independence(maps.flatten(2)), self.samples)


class MeanActivation(ScoredMethod):
    """Mean absolute activation: s_j = (1/(N·h·w)) Σ_i Σ_pos |a_ij(pos)|.

    Over every calibration image and every position of unit j's map (read at the group's
    first consumer). Default allocation global (mean-normalised per group).
    """

    name = "mean-activation"
    summary = "mean |activation| of the unit"
    default_allocation: Allocation = "global"

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        return unit_statistic(ctx, lambda maps: maps.abs().flatten(2).double().mean(-1))


class APoZ(ScoredMethod):
    """Hu et al. 2016, "Network Trimming": s_j = 1 − APoZ_j.

    APoZ_j = (1/(N·h·w)) Σ_i Σ_pos [a_ij(pos) = 0], the Average Percentage of Zeros of unit
    j's map (read at the group's first consumer, i.e. after the ReLU) over every calibration
    image and position; units that are mostly silent score low. Default allocation
    global.
    """

    name = "apoz"
    summary = "1 − average percentage of zeros after ReLU (Hu et al. 2016, Network Trimming)"
    default_allocation: Allocation = "global"

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        return unit_statistic(ctx, lambda maps: 1 - (maps == 0).flatten(2).double().mean(-1))
