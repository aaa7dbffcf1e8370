"""One-shot compensation after pruning: re-fit consumers by least squares, recalibrate BN.

Removing units leaves every consumer layer reading fewer inputs than it was trained on.
:func:`compensate` re-fits, for each such layer L, the weights on its remaining inputs so that
L's *pre-activation* output (the Conv/Linear module's own output, before BatchNorm and the
nonlinearity) on the calibration data matches the unpruned network's, restricted to the
output units L kept. Layers are fitted in forward order, input → output, and each fit reads
the pruned network's *actual* input to L — earlier layers already re-fitted — so later fits
also absorb what earlier ones could not restore.

Rows. For a Linear layer one row is one sample: x ∈ R^D (D = in_features of the pruned
layer) and y ∈ R^O (the original layer's outputs at the kept indices). For a Conv2d (Conv1d
is the same with a 1×k kernel) the pruned input ``(n, C, H, W)`` is zero-padded and unfolded
with the layer's kernel, stride and dilation into patches ``(n, C·kh·kw, P)``; patch column p
produces output position p, so (patch p, original output at p) is a row with D = C·kh·kw.
``locations`` positions are drawn per image without replacement (a seeded
``torch.Generator``; all P when P ≤ locations).

Normal equations, accumulated in float64 batch by batch (memory O(D² + D·O), never the
rows): with x̃ = [x, 1] when L has a bias (an intercept) and x̃ = x otherwise,

    A = Σ x̃ x̃ᵀ   (D̃, D̃),    B = Σ x̃ yᵀ   (D̃, O),    Σ y²,  Σ y  (O,)  over N rows.

The ridge solution is

    W = (A + λ·diag(1, …, 1, 0))⁻¹ B,    λ = ridge · tr(Σ x xᵀ) / D,

i.e. the penalty is relative to the mean second moment of the features (scale-free; the
intercept is not penalised). The new weight is Wᵀ reshaped to the layer's shape (and the
bias the last row of W), written in place so the Parameter objects stay the same.

Errors. For weights W, RSS(W) = Σ y² − 2·⟨W, B⟩ + ⟨W, A W⟩ and TSS = Σ_o (Σ y_o² −
(Σ y_o)² / N); :class:`LayerFit` reports RSS/TSS for the pruned layer's weights before the
fit (its inputs simply removed) and after it, on the accumulated rows (in-sample). With
fewer rows than features the fit is underdetermined and only the ridge keeps it finite:
give more calibration samples or conv ``locations``.

Each capture runs a model only as far as L (:func:`mipp.surgery.capture.forward_until`), so fitting
layer L costs one partial forward of each network per batch.

:func:`recalibrate_bn` re-estimates BatchNorm running statistics of a (pruned, compensated)
network on the calibration data. Since :func:`compensate` targets the *original*
pre-activations, the original BN statistics stay the right ones where a fit is exact;
recalibration matters where it is not, or without compensation.

>>> import copy, torch
>>> from torch import nn
>>> from mipp.surgery.structure import build_structure
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> x = torch.randn(200, 4)
>>> small = copy.deepcopy(net)
>>> removed = build_structure(small, x[:2]).remove({"0": [1, 5]})
>>> fits = compensate(net, small, x, kept_out={"0": [0, 2, 3, 4, 6, 7]})
>>> [(f.layer, f.rows, f.features, f.outputs) for f in fits]
[('2', 200, 6, 3)]
>>> fits[0].error_after < fits[0].error_before
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.modules import eval_mode
from mipp.progress import ProgressCallback, Reporter
from mipp.surgery.capture import forward_until, record_forward_order
from mipp.surgery.structure import ModelStructure

__all__ = ["LayerFit", "compensate", "finish", "kept_outputs", "recalibrate_bn"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: most elements one unfolded block of conv patches may hold (images are chunked to fit)
_UNFOLD_BUDGET = 2**24


@dataclass(frozen=True)
class LayerFit:
    """What :func:`compensate` did to one layer.

    ``rows``: regression rows accumulated (samples for Linear, samples × locations for
    convolutions); ``features``: inputs per row D (C·kh·kw for convolutions; the intercept
    not counted); ``outputs``: output units fitted. ``error_before`` / ``error_after``: RSS /
    TSS of the centred target on those rows, for the layer's weights before and after the
    fit. ``skipped``: why the layer was left alone (then ``rows`` is 0 and the errors NaN).
    """

    layer: str
    rows: int
    features: int
    outputs: int
    error_before: float
    error_after: float
    skipped: str | None = None


# ----------------------------------------------------------------------------- validation


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(x: Tensor, ridge: float, locations: int, batch_size: int, seed: int) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if not _is_int(locations) or locations < 1:
        raise ValueError(f"locations must be an integer >= 1, got {locations!r}")
    _check_batch(x, batch_size)
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_batch(x: Tensor, batch_size: int) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of inputs (n, *input_shape), got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"x must hold at least one calibration sample (n, *input_shape), got shape "
            f"{tuple(x.shape)}"
        )


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return fallback if p is None else p.device


def _forward_order(model: nn.Module, x: Tensor, names: Sequence[str]) -> list[str]:
    """``names`` (Conv/Linear layers of ``model``) in the order their forward first runs."""
    modules = dict(model.named_modules())
    recording = record_forward_order({n: modules[n] for n in names})
    with eval_mode(model), torch.no_grad(), recording as order:
        model(x.to(_device(model, x.device)))
    return list(order)


def _select_layers(
    original: nn.Module, pruned: nn.Module, x: Tensor, layers: Sequence[str] | None
) -> list[str]:
    orig = dict(original.named_modules())
    mine = dict(pruned.named_modules())
    candidates = [n for n, m in mine.items() if isinstance(m, _LAYERS)]
    if layers is None:
        chosen = [
            n
            for n in candidates
            if isinstance(orig.get(n), type(mine[n])) and _in_width(orig[n]) != _in_width(mine[n])
        ]
    else:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a sequence of layer names, got the string {layers!r}")
        chosen = list(dict.fromkeys(layers))
        for n in chosen:
            if n not in mine or n not in orig:
                where = " and ".join(
                    w for w, mods in (("pruned", mine), ("original", orig)) if n not in mods
                )
                raise MippError(
                    f"layer {n!r} is not a module of the {where} model; layers that can be "
                    f"compensated: {candidates}"
                )
            if not isinstance(mine[n], _LAYERS) or type(orig[n]) is not type(mine[n]):
                raise MippError(
                    f"layer {n!r} must be a Conv1d, Conv2d or Linear of the same type in both "
                    f"models, got {type(orig[n]).__name__} (original) and "
                    f"{type(mine[n]).__name__} (pruned)"
                )
    if not chosen:
        return []
    order = _forward_order(pruned, x[:1], chosen)
    missing = [n for n in chosen if n not in order]
    if missing and layers is not None:
        raise MippError(f"layers {missing} did not run in the pruned model's forward pass")
    return order


def _kept_index(
    name: str, orig: nn.Module, mine: nn.Module, kept_out: Mapping[str, Sequence[int]]
) -> Tensor:
    n_orig, n_mine = _out_width(orig), _out_width(mine)
    if name not in kept_out:
        if n_orig != n_mine:
            raise MippError(
                f"layer {name!r} has {n_mine} outputs after pruning and {n_orig} before, but "
                f"kept_out does not say which original outputs it kept"
            )
        return torch.arange(n_orig)
    kept = [int(i) for i in kept_out[name]]
    if len(kept) != n_mine or len(set(kept)) != len(kept) or any(not 0 <= i < n_orig for i in kept):
        raise MippError(
            f"kept_out[{name!r}] must hold {n_mine} distinct indices in [0, {n_orig}) (the "
            f"original outputs the pruned layer kept), got {kept}"
        )
    return torch.tensor(kept, dtype=torch.long)


# ----------------------------------------------------------------------------- the fit


class _NormalEquations:
    """Float64 sums A = Σ x̃x̃ᵀ, B = Σ x̃yᵀ, Σy², Σy over the rows seen (see the docstring)."""

    def __init__(self, features: int, outputs: int, *, intercept: bool, device) -> None:
        d = features + int(intercept)
        kw = {"dtype": torch.float64, "device": device}
        self.features, self.intercept = features, intercept
        self.a = torch.zeros(d, d, **kw)
        self.b = torch.zeros(d, outputs, **kw)
        self.yy = torch.zeros(outputs, **kw)
        self.sy = torch.zeros(outputs, **kw)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.to(self.a.device, torch.float64)
        y = y.to(self.a.device, torch.float64)
        if self.intercept:
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        self.a += x.T @ x
        self.b += x.T @ y
        self.yy += (y * y).sum(0)
        self.sy += y.sum(0)
        self.n += len(x)

    def solve(self, ridge: float) -> Tensor:
        d = self.features
        lam = ridge * float(self.a.diagonal()[:d].mean()) if d else 0.0
        reg = self.a.clone()
        reg.diagonal()[:d] += lam
        chol, info = torch.linalg.cholesky_ex(reg)
        if int(info) == 0:
            return torch.cholesky_solve(self.b, chol)
        return torch.linalg.pinv(reg, hermitian=True) @ self.b  # singular: minimum norm

    def error(self, w: Tensor) -> float:
        """RSS(w) / TSS on the accumulated rows; NaN when the target is constant."""
        rss = float(self.yy.sum() - 2 * (w * self.b).sum() + (w * (self.a @ w)).sum())
        tss = float((self.yy - self.sy**2 / max(self.n, 1)).sum())
        return max(rss, 0.0) / tss if tss > 0 else math.nan


def _stacked(layer: nn.Module) -> Tensor:
    """The layer's weights as (D̃, O): Wᵀ flattened per output, then the bias row if any."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).T
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach()[None, :]])
    return w.to(torch.float64, copy=True)  # never a view of the weight about to change


def _write(layer: nn.Module, w: Tensor) -> None:
    weight = w[: w.shape[0] - int(layer.bias is not None)].T.reshape(layer.weight.shape)
    with torch.no_grad():
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.data.copy_(w[-1].to(layer.bias.dtype))


def _conv_rows(
    conv: nn.Conv1d | nn.Conv2d, x: Tensor, y: Tensor, locations: int, gen: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """Rows ``(m, C·kh·kw)`` of input patches and ``(m, O)`` of outputs at sampled positions.

    ``x``: the layer's input ``(b, C, *spatial)``; ``y``: the target ``(b, O, *out_spatial)``.
    """
    x = F.pad(x, tuple(conv._reversed_padding_repeated_twice))
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv, nn.Conv1d):
        x, y = x.unsqueeze(2), y.unsqueeze(2)
        k, s, d = (1, *k), (1, *s), (1, *d)
    b = x.shape[0]
    feats = x.shape[1] * k[0] * k[1]
    targets = y.flatten(2)  # (b, O, P)
    p = targets.shape[2]
    rows = []
    step = max(1, _UNFOLD_BUDGET // max(1, feats * p))
    for i in range(0, b, step):
        patches = F.unfold(x[i : i + step], k, dilation=d, stride=s)  # (c, D, P)
        t = targets[i : i + step]
        if patches.shape[2] != p:
            raise MippError(
                f"{type(conv).__name__}: {patches.shape[2]} input patches but {p} output "
                f"positions in the original network; the layers' geometries differ"
            )
        if p > locations:
            pick = torch.rand(len(t), p, generator=gen).topk(locations, dim=1).indices
            pick = pick.to(x.device)[:, None, :]
            patches = patches.gather(2, pick.expand(-1, patches.shape[1], -1))
            t = t.gather(2, pick.expand(-1, t.shape[1], -1))
        rows.append(
            (patches.transpose(1, 2).reshape(-1, feats), t.transpose(1, 2).reshape(-1, t.shape[1]))
        )
    return rows


def _skip_reason(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}) is not supported"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
    return None


def _fit_layer(
    name: str,
    original: nn.Module,
    pruned: nn.Module,
    x: Tensor,
    kept: Tensor,
    *,
    ridge: float,
    locations: int,
    batch_size: int,
    gen: torch.Generator,
) -> LayerFit:
    orig = dict(original.named_modules())[name]
    layer = dict(pruned.named_modules())[name]
    features = layer.weight[0].numel()
    outputs = _out_width(layer)
    reason = _skip_reason(layer)
    if reason is not None:
        return LayerFit(name, 0, features, outputs, math.nan, math.nan, skipped=reason)
    acc_device = layer.weight.device
    if acc_device.type == "mps":  # no float64 there
        acc_device = torch.device("cpu")
    ne = _NormalEquations(features, outputs, intercept=layer.bias is not None, device=acc_device)
    dev_orig = _device(original, x.device)
    dev_mine = _device(pruned, x.device)
    with (
        forward_until(original, orig, record="output") as target_of,
        forward_until(pruned, layer, record="input") as input_of,
    ):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            inp = input_of(xb.to(dev_mine))
            tgt = target_of(xb.to(dev_orig)).index_select(1, kept.to(dev_orig)).to(inp.device)
            if isinstance(layer, nn.Linear):
                ne.add(inp.reshape(-1, features), tgt.reshape(-1, outputs))
            else:
                for xr, yr in _conv_rows(layer, inp, tgt, locations, gen):
                    ne.add(xr, yr)
    old = _stacked(layer).to(acc_device)
    new = ne.solve(ridge)
    _write(layer, new)
    return LayerFit(name, ne.n, features, outputs, ne.error(old), ne.error(new))


def compensate(
    original: nn.Module,
    pruned: nn.Module,
    x: Tensor,
    *,
    kept_out: Mapping[str, Sequence[int]],
    layers: Sequence[str] | None = None,
    ridge: float = 1e-2,
    locations: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> list[LayerFit]:
    """Re-fit the consumers of pruned units of ``pruned`` in place (see the module docstring).

    Args:
        original: the unpruned network (only run, never changed).
        pruned: the network after removal (``original`` with units deleted; same module
            names). Its layers' weights and biases are overwritten in place.
        x: calibration inputs ``(n, *input_shape)``; batches are moved to each model's device.
        kept_out: layer name → the original output indices that layer kept, for every layer
            whose output units were pruned (each group's producers keep the group's kept
            units). Layers not in it kept all outputs.
        layers: names of the layers to re-fit (Conv1d/Conv2d/Linear, present in both models).
            Default: every such layer of ``pruned`` whose input width differs from the
            original's — the consumers of pruned groups. They are always fitted in forward
            order.
        ridge: relative ridge penalty, λ = ridge · (mean diagonal of Σ x xᵀ); finite, >= 0.
        locations: output positions sampled per image for convolutions, >= 1.
        batch_size: calibration samples per forward pass, >= 1.
        seed: seeds the position sampling (a private ``torch.Generator``).
        progress: receives one ``"compensation"`` event per layer (also logged).

    Returns:
        One :class:`LayerFit` per layer, in the order fitted. Layers with ``groups != 1`` or
        a non-zero ``padding_mode`` are skipped with the reason, not fitted.

    Raises:
        ValueError: a bad option (the message names it and what is valid).
        MippError: a layer name missing from either model, or ``kept_out`` inconsistent with
            the layer widths.
    """
    _check_options(x, ridge, locations, batch_size, seed)
    if original is pruned:
        raise ValueError("original and pruned must be different modules (deepcopy before pruning)")
    names = _select_layers(original, pruned, x, layers)
    orig = dict(original.named_modules())
    mine = dict(pruned.named_modules())
    unknown = [n for n in kept_out if n not in orig or n not in mine]
    if unknown:
        raise MippError(
            f"kept_out names layers missing from the original or pruned model: {unknown}"
        )
    kept = {n: _kept_index(n, orig[n], mine[n], kept_out) for n in names}
    gen = torch.Generator().manual_seed(seed)
    report = Reporter(progress, __name__)
    fits = []
    for name in names:
        fit = _fit_layer(
            name,
            original,
            pruned,
            x,
            kept[name],
            ridge=ridge,
            locations=locations,
            batch_size=batch_size,
            gen=gen,
        )
        if fit.skipped:
            report("compensation", f"compensation: {name} skipped ({fit.skipped})", layer=name)
        else:
            note = " (fewer rows than features)" if fit.rows < fit.features else ""
            report(
                "compensation",
                f"compensation: {name}: {fit.rows} rows × {fit.features} features → "
                f"{fit.outputs} outputs, error {fit.error_before:.4g} → {fit.error_after:.4g}"
                + note,
                **dataclasses.asdict(fit),
            )
        fits.append(fit)
    return fits


# ----------------------------------------------------------------------------- BatchNorm


def recalibrate_bn(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``x``, in place.

    Every ``BatchNorm1d/2d/3d`` with ``track_running_stats`` has its statistics reset and
    its momentum set to ``None`` (PyTorch's cumulative average); ``x`` is forwarded in
    batches ``(batch_size, *input_shape)`` under ``no_grad`` with only those BatchNorms in
    train mode (Dropout and everything else in eval). A last batch of one sample is merged
    into the one before (BatchNorm cannot take a batch of one).

    The result is PyTorch's cumulative average over batches: ``running_mean`` is the mean
    of the per-batch means and ``running_var`` the mean of the per-batch *unbiased*
    variances — every batch weighs the same, and the spread of the batch means is not
    included, so it equals the statistics of all of ``x`` exactly only for a single batch
    (``batch_size >= len(x)``).

    Every module's train/eval mode and every BatchNorm's momentum are restored afterwards;
    if the forward raises, the previous running statistics are restored too.

    Returns:
        The number of BatchNorm layers recalibrated (0 leaves ``model`` untouched).
    """
    _check_batch(x, batch_size)
    bns = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, {k: v.clone() for k, v in bn.named_buffers()}) for bn in bns]
    starts = list(range(0, len(x), batch_size))
    if len(starts) > 1 and len(x) - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], len(x)]
    device = _device(model, x.device)
    ok = False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for a, b in zip(starts, ends, strict=True):
                model(x[a:b].to(device))
        ok = True
    finally:
        for m, mode in modes:
            m.training = mode
        for bn, momentum, buffers in saved:
            bn.momentum = momentum
            if not ok:
                with torch.no_grad():
                    for k, v in bn.named_buffers():
                        v.copy_(buffers[k])
    return len(bns)


def kept_outputs(
    structure: ModelStructure, removed: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """Layer → original output indices it kept, from the units removed per group.

    Every producer of a group with removals keeps its outputs for the group's other units
    (through the group's ``producer_index``, so concatenations map correctly).
    """
    out: dict[str, list[int]] = {}
    for g in structure.groups:
        gone = set(int(i) for i in removed.get(g.name, ()))
        if not gone:
            continue
        for p in g.producers:
            out[p] = sorted(g.producer_index[p][j] for j in range(g.size) if j not in gone)
    return out


def finish(
    original: nn.Module,
    pruned: nn.Module,
    structure: ModelStructure,
    removed: Mapping[str, Sequence[int]],
    x: Tensor,
    *,
    compensate_layers: bool,
    recalibrate: bool,
    collapsed: Sequence[str] = (),
    ridge: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """The optional one-shot repairs after removal, as :func:`mipp.pipeline` runs them.

    Compensation (if asked), then BatchNorm recalibration (if asked). Producers of a
    ``collapsed`` group keep their single placeholder unit dead (zero weights and bias) even
    when their own inputs were re-fitted. Returns the per-layer fit records (JSON-ready dicts
    for the prune report) and the seconds each step took.
    """
    records: list[dict] = []
    timings: dict[str, float] = {}
    if compensate_layers:
        t = time.perf_counter()
        fits = compensate(
            original,
            pruned,
            x,
            kept_out=kept_outputs(structure, removed),
            ridge=ridge,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        modules = dict(pruned.named_modules())
        with torch.no_grad():
            for name in collapsed:
                for p in structure.group(name).producers:
                    modules[p].weight.zero_()
                    if modules[p].bias is not None:
                        modules[p].bias.zero_()
        records = [dataclasses.asdict(f) for f in fits]
        timings["compensation"] = time.perf_counter() - t
    if recalibrate:
        t = time.perf_counter()
        recalibrate_bn(pruned, x, batch_size=batch_size)
        timings["recalibration"] = time.perf_counter() - t
    return records, timings
