"""ThiNet (Luo et al. 2017) and Channel Pruning (He et al. 2017): prune the units whose
removal least changes the next layer.

For a group g and each consumer layer c of g (Conv1d/Conv2d or Linear), ThiNet samples
entries of c's output on the calibration data — for a conv, ``samples_per_image`` random
(output channel, location) pairs per image, over at most ``images`` images; for a Linear,
``samples_per_image`` random output neurons per image — and splits each sampled entry
(bias excluded) into the contributions of g's units:

    ŷ = Σ_j x̂_j,    x̂_j = Σ_{k ∈ index(j)} Σ_taps W[o, k, taps] · patch[k, taps]

where ``index(j)`` are c's input indices of unit j (one channel for a conv consumer, the
flattened map for a Linear after ``flatten``) and ``patch`` is c's input window at the
sampled location. The rows of all consumers form X̂ ``(m, units)``.

**Greedy selection** (Algorithm 1): the removed set T starts empty; repeatedly the unit j
minimising ‖Σ_{i ∈ T∪{j}} x̂_i‖² joins T (incrementally, ‖r + x̂_j‖² = ‖r‖² + 2 rᵀx̂_j +
‖x̂_j‖² with r = Σ_T x̂, from the Gram matrix X̂ᵀX̂) until every live unit is ordered.
The unit's **score** is the relative reconstruction error ‖Σ_{T_k} x̂‖² / ‖Σ_all x̂‖² of the
removed set at the moment it joined (step k), made monotone with a running maximum and
raised by k·10⁻⁹/units so that ties keep the greedy order. Units removed earlier score
lower: the uniform allocation removes exactly ThiNet's greedy choice for any count, and
the global allocation compares relative errors across layers (they are comparable as they
are, hence ``normalize="none"`` by default).

**Least-squares re-fit** (ThiNet's channel scaling): after the decision, for each
consumer of each pruned group, ŵ = argmin ‖ŷ − X̂_kept ŵ‖² (``torch.linalg.lstsq`` in float64)
and the consumer's input weights of each kept unit j — all its input indices, output
channels and taps — are multiplied by ŵ_j. The target ŷ is the consumer's sampled output
on the model as it was first scored (the original model); X̂_kept is re-sampled at the same
positions on the masked model, group by group from the input side, so the re-fit also
accounts for units removed upstream and for consumers already re-fitted. With ``rounds > 1``
the re-fit also runs after every round (masked units stay zero). ``refit=False``
skips it.

>>> import torch
>>> from torch import nn
>>> import mipp
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
>>> result = mipp.prune(net, torch.randn(16, 1, 8, 8), method="thinet", sparsity=0.5)
>>> result.report.groups[0].width_after
2
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.methods.base import PruneContext
from mipp.methods.scored import Allocation, Normalize, ScoredMethod
from mipp.surgery.capture import capture_inputs
from mipp.surgery.structure import Consumer, UnitGroup

__all__ = [
    "ChannelPruning",
    "ThiNet",
    "conv_contributions",
    "greedy_order",
    "lasso_scores",
    "linear_contributions",
]

#: elements one gathered block of patches / weights may hold
_BUDGET = 2**22


def _unit_owner(consumer: Consumer, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input indices of all units, unit owning each) for a consumer."""
    idx = [i for ix in consumer.index for i in ix]
    owner = [j for j, ix in enumerate(consumer.index) for _ in ix]
    return (
        torch.tensor(idx, dtype=torch.long, device=device),
        torch.tensor(owner, dtype=torch.long, device=device),
    )


def _conv_geometry(conv: nn.Conv1d | nn.Conv2d, x: Tensor):
    """Padded 4-D input ``(b, C, H, W)``, 4-D weight and (kernel, stride, dilation, out size)."""
    pad = tuple(conv._reversed_padding_repeated_twice)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode) if any(pad) else x
    w = conv.weight
    if isinstance(conv, nn.Conv1d):
        xp, w = xp.unsqueeze(2), w.unsqueeze(2)
        k, s, d = (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation)
    else:
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
    out = tuple((xp.shape[2 + a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(2))
    return xp, w, k, s, d, out


def conv_output_shape(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[int, int]:
    """(output channels, output locations) of ``conv`` on input ``x``."""
    *_, out = _conv_geometry(conv, x)
    return conv.out_channels, out[0] * out[1]


def conv_contributions(
    conv: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    img: Tensor,
    out: Tensor,
    loc: Tensor,
    consumer: Consumer,
) -> Tensor:
    """Each unit's contribution to sampled conv outputs → ``(k, units)`` float64.

    ``x``: the conv's input ``(b, C, H, W)`` (or ``(b, C, L)`` for Conv1d); ``img``,
    ``out``, ``loc``: ``(k,)`` sampled image, output channel and flattened output location.
    Entry ``[r, j]`` is x̂_j = Σ_{c ∈ index(j)} Σ_taps W[out_r, c, taps] · patch_r[c, taps]
    (bias excluded; grouped convolutions honoured), so row sums give the sampled outputs
    minus bias.
    """
    xp, w, (kh, kw), (sh, sw), (dh, dw), (_, ow) = _conv_geometry(conv, x)
    chans, owner = _unit_owner(consumer, x.device)
    cin_g = conv.in_channels // conv.groups
    out_g = conv.out_channels // conv.groups
    units = torch.zeros(len(img), len(consumer.index), dtype=torch.float64, device=x.device)
    ar_h = torch.arange(kh, device=x.device) * dh
    ar_w = torch.arange(kw, device=x.device) * dw
    step = max(1, _BUDGET // max(1, len(chans) * kh * kw))
    for s in range(0, len(img), step):
        i, o, lc = img[s : s + step], out[s : s + step], loc[s : s + step]
        rows = (lc // ow * sh)[:, None] + ar_h  # (k, kh)
        cols = (lc % ow * sw)[:, None] + ar_w  # (k, kw)
        patch = xp[
            i[:, None, None, None],
            chans[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ].double()  # (k, c, kh, kw)
        local = chans[None, :] - (o // out_g * cin_g)[:, None]  # (k, c)
        valid = (local >= 0) & (local < cin_g)
        wk = w[o[:, None], local.clamp(0, cin_g - 1)].double()  # (k, c, kh, kw)
        per_chan = (wk * patch).sum((-1, -2)) * valid
        units[s : s + step].index_add_(1, owner, per_chan)
    return units


def linear_contributions(
    linear: nn.Linear, x: Tensor, img: Tensor, out: Tensor, consumer: Consumer
) -> Tensor:
    """Each unit's contribution to sampled Linear outputs → ``(k, units)`` float64.

    ``x``: the layer's input ``(b, F)``; ``img``, ``out``: ``(k,)`` sampled image and output
    neuron. Entry ``[r, j]`` is x̂_j = Σ_{f ∈ index(j)} W[out_r, f] · x[img_r, f].
    """
    feats, owner = _unit_owner(consumer, x.device)
    units = torch.zeros(len(img), len(consumer.index), dtype=torch.float64, device=x.device)
    step = max(1, _BUDGET // max(1, len(feats)))
    for s in range(0, len(img), step):
        i, o = img[s : s + step], out[s : s + step]
        per_feat = linear.weight[o][:, feats].double() * x[i][:, feats].double()
        units[s : s + step].index_add_(1, owner, per_feat)
    return units


def greedy_order(x: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
    """ThiNet's greedy removal order of the live units → (order ``(k,)``, errors ``(k,)``).

    ``x``: contributions X̂ ``(m, units)``; ``alive``: ``(units,)`` bool (only live units are
    ordered). Step t adds to the removed set T the unit j minimising ‖Σ_{i ∈ T∪{j}} x̂_i‖²
    (ties: lowest index); ``errors[t]`` is that minimum, the squared norm of the removed
    units' summed contribution after step t.
    """
    x = x.double()
    gram = x.T @ x
    diag = gram.diagonal().clone()
    cross = torch.zeros_like(diag)  # rᵀ x̂_j with r = Σ_T x̂
    rr = torch.zeros((), dtype=torch.float64)
    remaining = alive.clone().to(torch.bool)
    order, errors = [], []
    for _ in range(int(remaining.sum())):
        cost = rr + 2 * cross + diag
        cost[~remaining] = torch.inf
        j = int(torch.argmin(cost))
        rr = cost[j].clamp_min(0)
        cross += gram[j]
        remaining[j] = False
        order.append(j)
        errors.append(float(rr))
    return torch.tensor(order, dtype=torch.long), torch.tensor(errors, dtype=torch.float64)


def greedy_scores(x: Tensor, alive: Tensor) -> Tensor:
    """Scores ``(units,)`` float64 from the greedy order (see the module docstring).

    The unit added at step k scores max_{t ≤ k} err_t / ‖Σ_all x̂‖² + k·10⁻⁹/units; units
    not alive score 0.
    """
    x = x.double()
    order, errors = greedy_order(x, alive)
    scores = torch.zeros(x.shape[1], dtype=torch.float64)
    if len(order) == 0:
        return scores
    total = float(x.sum(1).square().sum())
    rel = errors / total if total > 0 else errors
    rel = torch.cummax(rel, 0).values
    rel = rel + torch.arange(1, len(order) + 1, dtype=torch.float64) * (1e-9 / x.shape[1])
    scores[order] = rel
    return scores


def refit_weights(x_kept: Tensor, target: Tensor) -> Tensor:
    """ŵ = argmin ‖target − x_kept ŵ‖² → ``(kept,)`` float64 (ThiNet's scaling re-fit).

    All-zero columns keep ŵ = 1 (nothing to fit); with fewer rows than fitted columns the
    problem is underdetermined and every ŵ stays 1.
    """
    x_kept, target = x_kept.double().cpu(), target.double().cpu()
    w = torch.ones(x_kept.shape[1], dtype=torch.float64)
    nz = x_kept.abs().sum(0) > 0
    if int(nz.sum()) == 0 or x_kept.shape[0] < int(nz.sum()):
        return w
    w[nz] = torch.linalg.lstsq(x_kept[:, nz], target[:, None], driver="gelsd").solution[:, 0]
    return w


def scale_inputs(module: nn.Module, consumer: Consumer, units: Tensor, w: Tensor) -> None:
    """Multiply ``module``'s input weights of each unit ``units[t]`` by ``w[t]``, in place.

    All the unit's input indices, every output channel and every tap (grouped convolutions:
    the output channels of the input channel's group).
    """
    weight = module.weight
    scale = torch.ones(weight.shape[1] * getattr(module, "groups", 1), dtype=torch.float64)
    for j, s in zip(units.tolist(), w.tolist(), strict=True):
        scale[list(consumer.index[j])] = s
    if isinstance(module, nn.Linear):
        per = scale[None, :]
    else:
        groups, cin_g = module.groups, weight.shape[1]
        per = scale.view(groups, cin_g).repeat_interleave(module.out_channels // groups, dim=0)
    per = per.reshape(*per.shape, *([1] * (weight.ndim - 2)))
    with torch.no_grad():
        weight.mul_(per.to(device=weight.device, dtype=weight.dtype))


class ThiNet(ScoredMethod):
    """Luo et al. 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
    Compression": greedy reconstruction error of the next layer + least-squares re-fit.

    See the module docstring for the maths. Options: ``samples_per_image`` (10, as in the
    paper) sampled outputs per image and consumer, over at most ``images`` (256) calibration
    images, seeded from the run's seed; ``refit`` (True) runs the channel-scaling re-fit.
    Needs no labels. Default allocation uniform (the paper's per-layer ratio);
    ``normalize="none"`` by default since relative errors are comparable across layers.
    """

    name = "thinet"
    summary = "greedy next-layer reconstruction error, then LS re-fit (Luo et al. 2017, ThiNet)"
    default_allocation: Allocation = "uniform"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        samples_per_image: int = 10,
        images: int = 256,
        refit: bool = True,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation, rounds=rounds, normalize=normalize, cost_aware=cost_aware
        )
        for key, v in (("samples_per_image", samples_per_image), ("images", images)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        if not isinstance(refit, bool):
            raise ValueError(f"refit must be True or False, got {refit!r}")
        self.samples_per_image, self.images, self.refit = samples_per_image, images, refit

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "samples_per_image": self.samples_per_image,
            "images": self.images,
            "refit": self.refit,
        }

    def contributions(
        self, ctx: PruneContext, groups: list[UnitGroup]
    ) -> dict[str, list[tuple[str, Tensor]]]:
        """Sampled contributions on ``ctx.model`` → ``{group: [(consumer layer, (m, units))]}``.

        Sample positions are drawn once per consumer layer (seeded from ``ctx.seed``) and
        kept in ``ctx.cache``, so later calls see the very same output entries.
        """
        modules = ctx.modules
        cache = ctx.cache.setdefault(self.name, {})
        positions: dict[str, list[tuple[Tensor, Tensor]]] = cache.setdefault("positions", {})
        gen = cache.setdefault("generator", torch.Generator().manual_seed(ctx.seed))
        by_layer: dict[str, list[tuple[UnitGroup, Consumer]]] = {}
        for g in groups:
            for c in g.consumers:
                module = modules[c.layer]
                if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
                    raise MippError(
                        f"ThiNet cannot sample outputs of {c.layer!r} "
                        f"({type(module).__name__}); expected Conv1d, Conv2d or Linear"
                    )
                by_layer.setdefault(c.layer, []).append((g, c))
        seen = {layer: 0 for layer in by_layer}

        def reduce(layer: str, x: Tensor) -> Tensor:
            module, b, s = modules[layer], x.shape[0], self.samples_per_image
            is_conv = not isinstance(module, nn.Linear)
            if not is_conv and x.ndim != 2:
                raise MippError(
                    f"ThiNet needs (batch, features) inputs for Linear {layer!r}, got shape "
                    f"{tuple(x.shape)}"
                )
            done = positions.setdefault(layer, [])
            k = seen[layer]
            seen[layer] += 1
            if k == len(done):
                outs, locs = conv_output_shape(module, x) if is_conv else (module.out_features, 1)
                done.append(
                    (
                        torch.randint(outs, (b * s,), generator=gen),
                        torch.randint(locs, (b * s,), generator=gen),
                    )
                )
            out, loc = (t.to(x.device) for t in done[k])
            img = torch.arange(b, device=x.device).repeat_interleave(s)
            parts = [
                conv_contributions(module, x, img, out, loc, c)
                if is_conv
                else linear_contributions(module, x, img, out, c)
                for _, c in by_layer[layer]
            ]
            return torch.cat(parts, dim=1)

        got = capture_inputs(
            ctx.model,
            (x for x, _ in ctx.batches(self.images)),
            {layer: modules[layer] for layer in by_layer},
            reduce,
        )
        result: dict[str, list[tuple[str, Tensor]]] = {g.name: [] for g in groups}
        for layer, pairs in by_layer.items():
            split = got[layer].split([g.size for g, _ in pairs], dim=1)
            for (g, _), part in zip(pairs, split, strict=True):
                result[g.name].append((layer, part))
        return result

    def scored_contributions(self, ctx: PruneContext) -> dict[str, list[tuple[str, Tensor]]]:
        """:meth:`contributions` of every group, keeping the first pass's sampled outputs (the
        original model's) as the re-fit's target."""
        rows = self.contributions(ctx, ctx.groups)
        ctx.cache[self.name].setdefault(
            "target",
            {name: {layer: x.sum(1) for layer, x in parts} for name, parts in rows.items()},
        )
        return rows

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        rows = self.scored_contributions(ctx)
        return {
            g.name: greedy_scores(torch.cat([x for _, x in rows[g.name]]), ctx.alive[g.name])
            for g in ctx.groups
        }

    def after_round(self, ctx: PruneContext, round: int) -> None:
        """Re-fit after an intermediate round too (see :meth:`before_removal`)."""
        self.before_removal(ctx, {name: ~alive for name, alive in ctx.alive.items()})

    def before_removal(self, ctx: PruneContext, removed: Mapping[str, Tensor]) -> None:
        """ThiNet's channel-scaling re-fit of every consumer of every pruned group.

        For each group with removed units (input side first) and each of its consumers:
        ŵ = argmin ‖ŷ − X̂_kept ŵ‖² on the sampled rows, then the consumer's input weights of
        kept unit j are multiplied by ŵ_j in place on ``ctx.model``.
        """
        if not self.refit:
            return
        targets = ctx.cache.get(self.name, {}).get("target")
        if targets is None:
            raise MippError("ThiNet.before_removal needs a scoring pass first (call scores)")
        modules = ctx.modules
        for g in sorted(ctx.groups, key=lambda g: g.position):
            gone = removed.get(g.name)
            if gone is None or not bool(gone.any()) or bool(gone.all()):
                continue
            kept = (~gone.cpu()).nonzero().flatten()
            now = self.contributions(ctx, [g])[g.name]
            for layer, x in now:
                w = refit_weights(x[:, kept], targets[g.name][layer])
                consumer = next(c for c in g.consumers if c.layer == layer)
                scale_inputs(modules[layer], consumer, kept, w)


def lasso_scores(x: Tensor, alive: Tensor) -> Tensor:
    """Channel Pruning's LASSO ranking → ``(units,)`` float64, higher = keep.

    β(α) = argmin_β (1/2m) ‖ŷ − X̂β‖² + α‖β‖₁ with ŷ = X̂·1 (the sampled outputs of the full
    layer), over the live units' columns; unit j's score is the α at which β_j first becomes
    non-zero on the exact LASSO path (LARS, :func:`sklearn.linear_model.lars_path`), divided
    by the largest such α — the order in which growing α would drive the units to zero,
    comparable across layers. Units that never enter, and dead ones, score 0. For orthogonal
    columns the entry α of unit j is ‖x̂_j‖² / m.
    """
    from sklearn.linear_model import lars_path

    x = x.double().cpu()
    live = alive.cpu().nonzero().flatten()
    scores = torch.zeros(x.shape[1], dtype=torch.float64)
    if len(live) == 0:
        return scores
    design = x[:, live].numpy()
    target = x.sum(1).numpy()
    if not float((design**2).sum()) > 0:
        return scores
    alphas, _, coefs = lars_path(design, target, method="lasso")
    nonzero = coefs != 0  # (units, knots)
    for col, j in enumerate(live.tolist()):
        hits = nonzero[col].nonzero()[0]
        if len(hits) and hits[0] > 0:
            scores[j] = float(alphas[hits[0] - 1])
    top = float(scores.max())
    return scores / top if top > 0 else scores


class ChannelPruning(ThiNet):
    """He, Zhang & Sun 2017, "Channel Pruning for Accelerating Very Deep Neural Networks":
    LASSO channel selection on the next layer's reconstruction, then a least-squares re-fit.

    The next layer's outputs are sampled as in :class:`ThiNet` (``samples_per_image`` random
    output entries per image over at most ``images`` images; the paper samples locations
    and keeps every output channel) and split into the units' contributions X̂; the units are
    ranked by the LASSO path of ŷ = X̂β (:func:`lasso_scores`): the paper raises the LASSO
    weight until as many β are zero as units must go, which removes the units the path
    zeroes first. Its reconstruction step — the consumers' weights re-fitted by least
    squares on the kept units — is mipp's compensation, so ``compensate`` defaults to on for
    this method (``compensate=False`` gives the selection alone). Needs no labels; default
    allocation uniform (the paper prunes each layer to a set width).
    """

    name = "channel-pruning"
    summary = "LASSO on the next layer's reconstruction, then LS re-fit (He et al. 2017)"
    default_allocation: Allocation = "uniform"

    def __init__(
        self,
        *,
        allocation: Allocation | None = None,
        samples_per_image: int = 10,
        images: int = 256,
        rounds: int = 1,
        normalize: Normalize = "none",
        cost_aware: bool = False,
    ) -> None:
        super().__init__(
            allocation=allocation,
            samples_per_image=samples_per_image,
            images=images,
            refit=False,
            rounds=rounds,
            normalize=normalize,
            cost_aware=cost_aware,
        )

    def options(self) -> dict[str, Any]:
        out = super().options()
        out.pop("refit")
        return out

    def default_repairs(self) -> tuple[bool, bool]:
        return True, False

    def scores(self, ctx: PruneContext) -> dict[str, Tensor]:
        rows = self.contributions(ctx, ctx.groups)
        return {
            g.name: lasso_scores(torch.cat([x for _, x in rows[g.name]]), ctx.alive[g.name])
            for g in ctx.groups
        }
