"""Signal-propagation pruning at initialisation (Lee, Ajanthan, Gould & Torr 2020, "A Signal
Propagation Perspective for Pruning Neural Networks at Initialization", ICLR).

The paper reads SNIP's connection sensitivity as a gradient, so it is only as reliable as the
network's signal propagation: with **layerwise dynamical isometry** — every layer's
input-output Jacobian has all its singular values equal to 1, which an orthogonal
initialisation gives — the gradients, hence the scores, are faithful. Pruning breaks that
isometry, and the paper restores it, without data, before training. Made structured for
mipp, in three steps:

1. **Orthogonal re-initialisation** (``reinit=True``, once, before the first round). Every
   Conv1d/Conv2d/Linear layer's weight, as the matrix ``W (out, in/groups · k)`` with k the
   product of the kernel size (1 for a Linear), becomes ``gain · Q`` with Q (semi-)orthogonal
   — ``Q Qᵀ = I`` when ``out ≤ in/groups · k``, else ``Qᵀ Q = I`` — drawn by
   :func:`torch.nn.init.orthogonal_` from a generator seeded with the run's ``seed``;
   biases are set to zero. A grouped convolution is block-diagonal, so each block of its
   ``groups`` (``out/groups`` rows) is drawn orthogonal on its own. Every normalisation
   layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) is reset to its fresh state
   (``reset_parameters``: running mean 0, variance 1, scale 1, shift 0), so that in eval
   mode a BatchNorm is ``x / √(1 + ε)`` and does not undo the isometry with the running
   statistics of weights that are gone. Other parameters (embeddings, transposed
   convolutions, ...) are left as they are. This is a *pruning-at-initialisation* method: it
   throws away the weights it is given (a trained network is pruned as if it were freshly
   initialised, and must be trained from scratch). ``reinit=False`` scores the weights as
   they are and leaves the normalisation layers alone.

2. **Data-free connection sensitivity.** SNIP's per-weight score ``|g ⊙ w|`` with
   ``g = ∇_w L`` — not on the calibration data but on n i.i.d. standard-normal inputs of
   its shape (n = the calibration set's size), drawn from a generator seeded with
   ``seed + 1`` (:func:`gaussian_inputs`); the loss needs no labels:

       L = (1/n) Σ_i CE(f(z_i), u) = (1/n) Σ_i [log Σ_c exp f_c(z_i) − (1/C) Σ_c f_c(z_i)],

   the cross-entropy of the logits ``f(z_i) (C,)`` (class dimension 1 of the output) to the
   uniform distribution ``u = 1/C`` (:func:`uniform_loss_gradient`). The paper shows that
   pruning at initialisation works without supervision; of the label-free losses this one
   is SNIP's own loss with its labels averaged out: cross-entropy is linear in its target,
   so L is the expectation of SNIP's loss over uniformly random labels, without their
   sampling noise, and ``∂L/∂f = (softmax f − u) / n`` is zero only for a network whose
   output is already uninformative. Scores depend on the calibration data's shape only,
   never on its values or labels. As for SNIP, a unit's score is the L1 aggregate over its
   own parameters, ``s_j = Σ_{w ∈ unit j} |g_w · w|`` (its producers' weight rows and bias
   entries; :func:`~mipp.methods.scored.unit_sum`); the model runs in eval mode.

3. **Approximate isometry of the pruned network** (``isometry=True``). The paper restores
   isometry in the sparse network by minimising ``‖(C ⊙ W)ᵀ(C ⊙ W) − I‖²_F`` over the kept
   weights (C the weight mask). Removing whole units leaves each layer a *dense* matrix:
   ``W_K (r, c)``, W restricted to its kept output rows (the rows of kept units of the
   groups it produces, or passes through depthwise) and kept input columns (the columns of
   kept units of the groups it consumes; for a conv, all k taps of a kept input channel).
   The objective's minimisers (``W_K W_Kᵀ = I`` or ``W_Kᵀ W_K = I``, on the smaller side)
   are many; the paper takes gradient steps from ``W_K``, we take the minimiser closest to
   it: the matrix with all its singular values equal to ``gain`` closest to ``W_K`` in
   Frobenius norm is ``gain · U Vᵀ`` from the thin SVD ``W_K = U S Vᵀ`` (its polar factor,
   :func:`polar_factor`), which :func:`isometrise` writes back into those entries of every
   Conv/Linear layer (per block for grouped convolutions). It runs on the masked working
   model just before removal, so the removed entries (already zero) go with their units
   and the pruned layers are exactly isometric. The normalisation layers are not touched
   again: after ``reinit`` they are the identity-like fresh layers; with ``reinit=False``
   their running statistics describe the weights before this step (``recalibrate_bn=True``
   re-estimates them).

What differs from the paper: units instead of single weights (L1 aggregation, as mipp does
for SNIP); the paper's convolutions are initialised with orthogonal *convolution kernels*
(the construction of Xiao et al. 2018), here the flattened ``(out, in · k)`` matrix is
orthogonal — the same matrix the isometry step then works on; the isometry is solved in
closed form rather than by gradient steps; the label-free loss and Gaussian inputs are our
reading of its data-free, unsupervised pruning. Default: one round, allocation global,
``normalize="mean"`` (as SNIP), ``gain = 1`` (the paper's).

>>> import torch
>>> from torch import nn
>>> import mipp
>>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
>>> result = mipp.prune(net, torch.randn(32, 8), method="sp-pai", sparsity=0.5)
>>> result.report.groups[0].width_after
8
>>> s = torch.linalg.svdvals(result.model[0].weight.detach())  # all equal to the gain
>>> bool(torch.allclose(s, torch.ones(8), atol=1e-5))
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp import distributed
from mipp.errors import MippError
from mipp.inputs import Samples
from mipp.methods.base import Budget, Decision, PruneContext
from mipp.methods.baselines.gradient import (
    _count,
    _grad,
    _l1_scores,
    _scoring,
    layer_parameters,
)
from mipp.methods.scored import Allocation, Normalize, ScoredMethod
from mipp.surgery.layers import NORMS
from mipp.surgery.structure import UnitGroup

__all__ = [
    "SignalPropagation",
    "gaussian_inputs",
    "isometrise",
    "orthogonal_init",
    "polar_factor",
    "uniform_loss_gradient",
]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


# ----------------------------------------------------------------------------- helpers


def _layers(model: nn.Module) -> list[tuple[str, nn.Conv1d | nn.Conv2d | nn.Linear]]:
    """(name, module) of every Conv1d/Conv2d/Linear layer, a shared weight once."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append((name, module))
    return out


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def orthogonal_init(
    model: nn.Module, *, gain: float = 1.0, generator: torch.Generator | None = None
) -> None:
    """Re-initialise ``model`` in place: orthogonal layers, zero biases, fresh norms.

    Every Conv1d/Conv2d/Linear weight ``(out, in/groups, *kernel)``, in module order, is
    drawn as ``groups`` blocks of ``out/groups`` rows, each ``gain ·`` a (semi-)orthogonal
    ``(out/groups, in/groups · k)`` matrix (:func:`torch.nn.init.orthogonal_`, float64 on the
    CPU from ``generator``, so the draw does not depend on the model's dtype or device); its
    bias is set to 0. Every normalisation layer (:data:`~mipp.surgery.layers.NORMS`) is
    reset (``reset_parameters``: running statistics 0 / 1, scale 1, shift 0).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORMS):
                module.reset_parameters()
        for _, module in _layers(model):
            weight = module.weight
            blocks = getattr(module, "groups", 1)
            rows = weight.shape[0] // blocks
            fresh = torch.empty(weight.shape, dtype=torch.float64)
            for b in range(blocks):
                nn.init.orthogonal_(
                    fresh[b * rows : (b + 1) * rows], gain=gain, generator=generator
                )
            weight.copy_(fresh.to(dtype=weight.dtype))
            if module.bias is not None:
                module.bias.zero_()


def gaussian_inputs(samples: Samples, generator: torch.Generator) -> Samples:
    """Standard-normal stand-ins for ``samples``: every tensor's shape, dtype and device.

    One float32 draw ``(n, D)`` with D the summed per-sample sizes of the input tensors is
    split among them in order, so the same numbers reach the model whether it takes one
    tensor or the same features as several (positional or keyword) tensors.

    Raises:
        MippError: an input tensor is not floating-point (token ids, masks): Gaussian
            values cannot stand in for them.
    """
    kinds = sorted({_dtype(t) for t in samples.tensors if not t.is_floating_point()})
    if kinds:
        raise MippError(
            f"standard-normal inputs can only replace floating-point inputs; the calibration "
            f"data has {samples.describe()}, holding {', '.join(kinds)}"
        )
    n = len(samples)
    sizes = [math.prod(t.shape[1:]) for t in samples.tensors]
    draw = torch.randn((n, sum(sizes)), generator=generator, dtype=torch.float32)
    parts = iter(draw.split(sizes, dim=1))

    def fill(t: Tensor) -> Tensor:
        return next(parts).reshape(t.shape).to(device=t.device, dtype=t.dtype)

    value = samples.value
    if isinstance(value, Tensor):
        return samples.with_value(fill(value))
    if isinstance(value, Mapping):
        return samples.with_value({k: fill(v) for k, v in value.items()})
    return samples.with_value(tuple(fill(v) for v in value))


def uniform_loss_gradient(
    model: nn.Module, batches: Sequence[Samples], params: Sequence[Tensor]
) -> list[Tensor]:
    """``∇_θ L`` with ``L = (1/n) Σ_i CE(f(x_i), u)``, u uniform over the C classes.

    ``f(x_i)`` is the output ``(b, C, ...)`` (class dimension 1, as ``F.cross_entropy``);
    ``CE(f, u) = logsumexp_c f_c − (1/C) Σ_c f_c``, summed over any further output
    positions. Chunk gradients are added, each scaled by 1/n, so the result does not depend
    on the chunking. The model is used as it is (set eval mode yourself).
    """
    n = _count([(x, None) for x in batches])
    total = [torch.zeros_like(p) for p in params]
    for x in batches:
        logits = x.run(model)
        if logits.ndim < 2 or logits.shape[1] < 2:
            raise MippError(
                f"the data-free loss needs an output (batch, classes >= 2, ...); the model "
                f"gave shape {tuple(logits.shape)}"
            )
        target = torch.full_like(logits, 1.0 / logits.shape[1])
        loss = F.cross_entropy(logits, target, reduction="sum") / n
        for t, g in zip(total, _grad(loss, params), strict=True):
            t += g.detach()
    distributed.all_reduce_(total)  # every rank's chunks (no-op on one process)
    return total


def polar_factor(m: Tensor) -> Tensor:
    """``U Vᵀ`` from the thin SVD ``m = U S Vᵀ`` of ``m (..., r, c)``: the matrix with all
    min(r, c) singular values 1 closest to ``m`` in Frobenius norm (batched over ``...``)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _removed_indices(
    groups: Sequence[UnitGroup], removed: Mapping[str, Tensor]
) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per layer: the output rows and the input indices of the removed units."""
    rows: dict[str, set[int]] = {}
    inputs: dict[str, set[int]] = {}
    for g in groups:
        gone = removed.get(g.name)
        if gone is None or not bool(gone.any()):
            continue
        units = gone.cpu().nonzero().flatten().tolist()
        for p in [*g.producers, *g.channelwise]:
            index = g.producer_index.get(p, g.producer_index[g.root])
            rows.setdefault(p, set()).update(c for j in units for c in index[j])
        for c in g.consumers:
            inputs.setdefault(c.layer, set()).update(i for j in units for i in c.index[j])
    return rows, inputs


def _isometrise_layer(
    module: nn.Conv1d | nn.Conv2d | nn.Linear,
    rows_gone: set[int],
    inputs_gone: set[int],
    gain: float,
) -> None:
    weight = module.weight
    out, width = weight.shape[0], weight.shape[1]  # width: input channels per block
    taps = math.prod(weight.shape[2:])
    blocks = getattr(module, "groups", 1)
    per = out // blocks
    mat = weight.detach().to(device="cpu", dtype=torch.float64).reshape(out, width * taps)
    new = mat.clone()
    by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
    for b in range(blocks):
        kept_rows = [r for r in range(b * per, (b + 1) * per) if r not in rows_gone]
        kept_chans = [c for c in range(width) if b * width + c not in inputs_gone]
        if not kept_rows or not kept_chans:
            continue
        cols = (torch.tensor(kept_chans)[:, None] * taps + torch.arange(taps)).flatten()
        by_shape.setdefault((len(kept_rows), len(cols)), []).append((torch.tensor(kept_rows), cols))
    for pairs in by_shape.values():
        r = torch.stack([a for a, _ in pairs])[:, :, None]  # (B, rows, 1)
        c = torch.stack([b for _, b in pairs])[:, None, :]  # (B, 1, cols)
        new[r, c] = gain * polar_factor(mat[r, c])
    with torch.no_grad():
        weight.copy_(new.reshape(weight.shape).to(dtype=weight.dtype))


def isometrise(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    removed: Mapping[str, Tensor],
    *,
    gain: float = 1.0,
) -> None:
    """Make every Conv/Linear layer's kept weights ``gain ·`` their polar factor, in place.

    ``removed[g]`` (bool ``(size,)``) marks group g's removed units. A layer's kept matrix
    is its ``(out, in/groups · k)`` weight restricted to the rows not holding removed units
    (as a producer, or a depthwise conv they pass through) and the columns not reading
    them (as a consumer: every tap of the unit's input channels, or the unit's flattened
    features); per block for grouped convolutions. That matrix is replaced by
    ``gain · U Vᵀ`` (:func:`polar_factor`, float64 on the CPU); every other entry, biases
    included, is left as it is.
    """
    rows, inputs = _removed_indices(groups, removed)
    for name, module in _layers(model):
        _isometrise_layer(module, rows.get(name, set()), inputs.get(name, set()), gain)


# ----------------------------------------------------------------------------- method


class SignalPropagation(ScoredMethod):
    """Lee et al. 2020, "A Signal Propagation Perspective for Pruning Neural Networks at
    Initialization": data-free SNIP after an orthogonal re-initialisation, then the kept
    layers made isometric (see the module docstring for the equations).

    Options: ``reinit`` (True) re-initialises the working model orthogonally before scoring
    — a pruning-at-initialisation method, meant for networks that will be trained from
    scratch; ``isometry`` (True) replaces each kept layer matrix by its polar factor after
    the decision; ``gain`` (1.0) is the orthogonal matrices' scale (their singular values).
    Needs no labels; one round, allocation global, ``normalize="mean"`` (as SNIP).

    >>> SignalPropagation().options()["reinit"], SignalPropagation.needs_labels
    (True, False)
    """

    name = "sp-pai"
    summary = "data-free SNIP after orthogonal init, kept layers isometric (Lee et al. 2020)"
    default_allocation: Allocation = "global"
    needs_labels = False
    l1_aggregated = True

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        rounds: int = 1,
        normalize: Normalize = "mean",
        cost_aware: bool = False,
        reinit: bool = True,
        isometry: bool = True,
        gain: float = 1.0,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        for key, v in (("reinit", reinit), ("isometry", isometry)):
            if not isinstance(v, bool):
                raise ValueError(f"{key} must be True or False, got {v!r}")
        ok = isinstance(gain, int | float) and not isinstance(gain, bool)
        if not (ok and math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        self.reinit, self.isometry, self.gain = reinit, isometry, float(gain)

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "reinit": self.reinit,
            "isometry": self.isometry,
            "gain": self.gain,
        }

    def decide(self, ctx: PruneContext, budget: Budget) -> Decision:
        """Re-initialise (``reinit``), then the rounds of :meth:`ScoredMethod.decide`."""
        if self.reinit:
            t = time.perf_counter()
            orthogonal_init(
                ctx.model, gain=self.gain, generator=torch.Generator().manual_seed(ctx.seed)
            )
            ctx.timings["scoring"] = ctx.timings.get("scoring", 0.0) + time.perf_counter() - t
        return super().decide(ctx, budget)

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        cache = ctx.cache.setdefault(self.name, {})
        if "inputs" not in cache:
            gen = torch.Generator().manual_seed(ctx.seed + 1)
            try:
                cache["inputs"] = gaussian_inputs(ctx.inputs, gen)
            except MippError as e:
                raise MippError(f"method {self.name!r} scores without the data: {e}") from None
        batches = list(cache["inputs"].batches(ctx.batch_size))
        params = layer_parameters(ctx.model)
        with _scoring(ctx.model, params):
            g = uniform_loss_gradient(ctx.model, batches, params)
        per_weight = {id(p): gi * p.detach() for p, gi in zip(params, g, strict=True)}
        return _l1_scores(ctx, ctx.modules, per_weight)

    def before_removal(self, ctx: PruneContext, removed: Mapping[str, Tensor]) -> None:
        """Approximate isometry (``isometry``): every kept layer matrix → gain · polar factor."""
        if not self.isometry:
            return
        t = time.perf_counter()
        isometrise(ctx.model, ctx.groups, removed, gain=self.gain)
        ctx.timings["scoring"] = ctx.timings.get("scoring", 0.0) + time.perf_counter() - t
