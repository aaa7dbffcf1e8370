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
``torch.Generator``, layer by layer in forward order, then batch by batch, then unfold chunk
by chunk; all P when P ≤ locations).

Normal equations, accumulated in float64 batch by batch (memory O(D² + D·O); while there
are no more rows than features, the rows themselves, O(N·D), and the dual form below): with
x̃ = [x, 1] when L has a bias (an intercept) and x̃ = x otherwise,

    A = Σ x̃ x̃ᵀ   (D̃, D̃),    B = Σ x̃ yᵀ   (D̃, O),    Σ y²,  Σ y  (O,)  over N rows.

The ridge solution is

    W = (A + λ·diag(1, …, 1, 0))⁻¹ B,    λ = ridge · tr(Σ x xᵀ) / D,

i.e. the penalty is relative to the mean second moment of the features (scale-free; the
intercept is not penalised). With N ≤ D̃ rows the same solution comes from an N×N system:
ridge on the centred rows (x − x̄, y − ȳ), W = Xcᵀ (Xc Xcᵀ + λI)⁻¹ Yc and the intercept
ȳ − x̄ᵀW [ours; the classical dual form of ridge regression]. The new weight is Wᵀ reshaped
to the layer's shape (and the bias the last row of W), written in place so the Parameter
objects stay the same.

Errors. For weights W, RSS(W) = Σ y² − 2·⟨W, B⟩ + ⟨W, A W⟩ and TSS = Σ_o (Σ y_o² −
(Σ y_o)² / N); :class:`LayerFit` reports RSS/TSS for the pruned layer's weights before the
fit (its inputs simply removed) and after it, on the accumulated rows (in-sample). With
fewer rows than features the fit is underdetermined and only the ridge keeps it finite:
give more calibration samples or conv ``locations``.

Two paths, the same rows in the same order, the same weights. With n calibration samples in
batches of ``batch_size`` and K layers to fit:

- ``path="single-pass"``: one pass of the *original* network over the batches records the
  targets (each layer's output at the kept indices and, for convolutions, only at the
  sampled positions, drawn up front in the order above); then one pass of the *pruned*
  network in which every batch's forward runs in its own worker thread and stops in L's
  forward pre-hook; when all batches have arrived, L is fitted on their inputs, its new
  weights written, and the forwards go on to the next layer. Cost: about one forward of
  each network over the calibration set (each stops after the last layer fitted) plus the
  K fits — linear in depth. Memory: the activations the paused forwards hold for all n
  samples at once (≈ one forward at batch n; the per-op temporaries stay those of one
  batch) plus the targets (per convolution n · min(locations, P) · O values and
  n · locations indices, per Linear n · O values).
- ``path="per-layer"``: for each L, each batch runs both networks only as far as L
  (:func:`mipp.surgery.capture.forward_until`): Σ_L depth(L) partial forwards, quadratic in
  depth, with the memory of one batch.
- ``path="auto"`` (default): the single pass, unless its estimated memory exceeds
  ``memory_budget`` (by default half of the memory free on the pruned model's device);
  then the per-layer path.

The worker threads of the single pass run strictly one at a time (a hand-off, not
parallelism): every operation sees the same batch, in the same order, as in the per-layer
path, so the rows — and the weights — are the same. Forwarding the calibration set as one
batch of n instead would need the same activation memory, per-op temporaries of batch n,
and different batch shapes per op, whose rounding differs from the per-layer path.

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

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mipp import distributed
from mipp.errors import MippError
from mipp.inputs import Samples, as_samples
from mipp.modules import eval_mode
from mipp.progress import ProgressCallback, Reporter
from mipp.surgery.capture import forward_until
from mipp.surgery.structure import ModelStructure

__all__ = ["LayerFit", "compensate", "finish", "kept_outputs", "recalibrate_bn"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: most elements one unfolded block of conv patches may hold (images are chunked to fit)
_UNFOLD_BUDGET = 2**24
#: the values of ``compensate(path=...)``
PATHS = ("auto", "single-pass", "per-layer")

_log = logging.getLogger(__name__)


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


def _check_options(
    x: Tensor | Samples,
    ridge: float,
    locations: int,
    batch_size: int,
    seed: int,
    path: str,
    memory_budget: int | None,
) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if not _is_int(locations) or locations < 1:
        raise ValueError(f"locations must be an integer >= 1, got {locations!r}")
    _check_batch(x, batch_size)
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    if memory_budget is not None and (not _is_int(memory_budget) or memory_budget < 0):
        raise ValueError(
            f"memory_budget must be a number of bytes >= 0 or None, got {memory_budget!r}"
        )


def _check_batch(x: Tensor | Samples, batch_size: int) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(x, Samples):
        if len(x) == 0:
            raise ValueError(f"x must hold at least one calibration sample, got {x!r}")
        return
    if not isinstance(x, Tensor):
        raise TypeError(
            f"x must be a tensor of inputs (n, *input_shape) or mipp.inputs.Samples, got "
            f"{type(x).__name__}"
        )
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


def _tensors(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class _Probe:
    """What one forward of one sample through the pruned model showed (:func:`_probe`).

    ``order``: the layers in the order their forward first ran; ``shapes``: each one's
    output shape ``(1, O, *out_spatial)`` at that first call; ``live``: the most bytes of
    module outputs (and the layer's own input) alive at the first call of any of them — the
    activations a forward paused there holds, per sample.
    """

    order: list[str]
    shapes: dict[str, torch.Size]
    live: int


def _probe(model: nn.Module, x: Samples, names: Sequence[str]) -> _Probe:
    """Forward ``x`` (one sample) through ``model``, watching the layers ``names``."""
    modules = dict(model.named_modules())
    probe = _Probe([], {}, 0)
    tracked: dict[int, tuple[weakref.ref, int]] = {}  # storage address → (tensor, bytes)
    x = x.to(_device(model, x.device))
    own = {t.untyped_storage().data_ptr() for t in x.tensors}  # held by the caller anyway

    def track(t: Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in own:
            size = t.numel() * t.element_size()
            old = tracked.get(key)
            alive = old is not None and old[0]() is not None
            tracked[key] = (weakref.ref(t), max(size, old[1]) if alive else size)

    def on_output(mod: nn.Module, args: tuple, out: object) -> None:
        for t in _tensors(out):
            track(t)

    def make(name: str):
        def pre(mod: nn.Module, args: tuple) -> None:
            if name in probe.order:
                return
            probe.order.append(name)
            for t in _tensors(args):
                track(t)
            live = sum(size for ref, size in tracked.values() if ref() is not None)
            probe.live = max(probe.live, live)

        def post(mod: nn.Module, args: tuple, out: object) -> None:
            if name not in probe.shapes and isinstance(out, Tensor):
                probe.shapes[name] = out.shape

        return pre, post

    handles = []
    with eval_mode(model), torch.no_grad():
        try:
            for module in model.modules():
                handles.append(module.register_forward_hook(on_output))
            for name in names:
                pre, post = make(name)
                handles.append(modules[name].register_forward_pre_hook(pre))
                handles.append(modules[name].register_forward_hook(post))
            x.run(model)
        finally:
            for h in handles:
                h.remove()
            tracked.clear()
    return probe


def _select_layers(
    original: nn.Module, pruned: nn.Module, layers: Sequence[str] | None
) -> list[str]:
    orig = dict(original.named_modules())
    mine = dict(pruned.named_modules())
    candidates = [n for n, m in mine.items() if isinstance(m, _LAYERS)]
    if layers is None:
        return [
            n
            for n in candidates
            if isinstance(orig.get(n), type(mine[n])) and _in_width(orig[n]) != _in_width(mine[n])
        ]
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
    return chosen


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
    """Float64 sums A = Σ x̃x̃ᵀ, B = Σ x̃yᵀ, Σy², Σy over the rows seen (see the docstring).

    While there are no more rows than features the rows themselves are kept instead of A and
    B (O(N·D̃) memory, not O(D̃²)), and :meth:`solve` uses the dual form of the same ridge
    solution (an N×N system): a 25,088-input classifier fitted on 256 samples costs a
    256×256 factorisation, not a 25,088×25,088 one."""

    def __init__(self, features: int, outputs: int, *, intercept: bool, device) -> None:
        d = features + int(intercept)
        self.kw = {"dtype": torch.float64, "device": device}
        self.device = torch.device(device)
        self.features, self.intercept, self.outputs = features, intercept, outputs
        self.width = d
        self.a: Tensor | None = None
        self.b: Tensor | None = None
        self.rows: list[tuple[Tensor, Tensor]] | None = []  # None once A and B are summed
        self.yy = torch.zeros(outputs, **self.kw)
        self.sy = torch.zeros(outputs, **self.kw)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.to(self.device, torch.float64)
        y = y.to(self.device, torch.float64)
        if self.intercept:
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        self.yy += (y * y).sum(0)
        self.sy += y.sum(0)
        self.n += len(x)
        if self.rows is not None:
            self.rows.append((x, y))
            if self.n <= self.width:
                return
            x, y = self._stack()  # more rows than features from now on: sum A and B
            self.rows = None
            self.a = torch.zeros(self.width, self.width, **self.kw)
            self.b = torch.zeros(self.width, self.outputs, **self.kw)
        self.a += x.T @ x
        self.b += x.T @ y

    def all_reduce(self) -> None:
        """Under ``torch.distributed``, make these the equations of every rank's rows
        (:mod:`mipp.distributed`): the rows themselves, gathered in rank order, while the
        ranks hold no more rows in all than features (each rank is then still keeping its
        rows); else the sums A, B, Σy², Σy added over ranks (a rank still keeping rows sums
        them first). A no-op without a process group."""
        if not distributed.active():
            return
        total = distributed.total(self.n)
        if total <= self.width:  # every rank keeps its rows: gather them
            parts = distributed.gather_objects(tuple(t.cpu() for t in self._stack()))
            x = torch.cat([p[0] for p in parts]).to(self.device)
            y = torch.cat([p[1] for p in parts]).to(self.device)
            self.rows = [(x, y)]
            self.yy = (y * y).sum(0)
            self.sy = y.sum(0)
            self.n = total
            return
        if self.rows is not None:
            x, y = self._stack()
            self.rows = None
            self.a = x.T @ x
            self.b = x.T @ y
        sums = [self.a, self.b, self.yy, self.sy]
        moved = [t.cpu() for t in sums]
        distributed.all_reduce_(moved)
        for t, m in zip(sums, moved, strict=True):
            t.copy_(m)
        self.n = total

    def _stack(self) -> tuple[Tensor, Tensor]:
        if not self.rows:
            return (
                torch.zeros(0, self.width, **self.kw),
                torch.zeros(0, self.outputs, **self.kw),
            )
        if len(self.rows) > 1:  # concatenated once, for the solve and both errors
            self.rows = [
                (torch.cat([r[0] for r in self.rows]), torch.cat([r[1] for r in self.rows]))
            ]
        return self.rows[0]

    def solve(self, ridge: float) -> Tensor:
        d = self.features
        if self.rows is not None:
            return self._solve_dual(ridge)
        lam = ridge * float(self.a.diagonal()[:d].mean()) if d else 0.0
        reg = self.a.clone()
        reg.diagonal()[:d] += lam
        chol, info = torch.linalg.cholesky_ex(reg)
        if int(info) == 0:
            return torch.cholesky_solve(self.b, chol)
        return torch.linalg.pinv(reg, hermitian=True) @ self.b  # singular: minimum norm

    def _solve_dual(self, ridge: float) -> Tensor:
        """The same solution from the rows: with the intercept unpenalised, ridge on centred
        rows, W = Xcᵀ (Xc Xcᵀ + λI)⁻¹ Yc and the intercept ȳ − x̄ᵀW."""
        x, y = self._stack()
        d = self.features
        feats = x[:, :d]
        lam = ridge * float((feats**2).sum(0).mean()) if d and len(x) else 0.0
        if self.intercept:
            mx, my = feats.mean(0), y.mean(0)
            feats, y = feats - mx, y - my
        k = feats @ feats.T
        k.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) == 0:
            alpha = torch.cholesky_solve(y, chol)
        else:  # singular (no ridge): the minimum-norm solution
            alpha = torch.linalg.pinv(k, hermitian=True) @ y
        w = feats.T @ alpha
        if self.intercept:
            w = torch.cat([w, (my - mx @ w)[None, :]])
        return w

    def error(self, w: Tensor) -> float:
        """RSS(w) / TSS on the accumulated rows; NaN when the target is constant."""
        if self.rows is not None:
            x, y = self._stack()
            rss = float(((y - x @ w) ** 2).sum())
        else:
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


def _accumulator(layer: nn.Module) -> _NormalEquations:
    device = layer.weight.device
    if device.type == "mps":  # no float64 there
        device = torch.device("cpu")
    return _NormalEquations(
        layer.weight[0].numel(), _out_width(layer), intercept=layer.bias is not None, device=device
    )


def _solve(name: str, layer: nn.Module, ne: _NormalEquations, ridge: float) -> LayerFit:
    """Solve the accumulated equations, write the new weights; the record of the fit."""
    old = _stacked(layer).to(ne.device)
    ne.all_reduce()  # under torch.distributed: every rank's rows (mipp.distributed)
    new = ne.solve(ridge)
    _write(layer, new)
    return LayerFit(name, ne.n, ne.features, _out_width(layer), ne.error(old), ne.error(new))


def _chunks(b: int, features: int, p: int) -> list[tuple[int, int]]:
    """Image ranges ``[i, j)`` of a batch of ``b`` that are unfolded together (at most about
    ``_UNFOLD_BUDGET`` patch elements, ``features · p`` per image)."""
    step = max(1, _UNFOLD_BUDGET // max(1, features * p))
    return [(i, min(i + step, b)) for i in range(0, b, step)]


def _draw(
    chunks: Sequence[tuple[int, int]], p: int, locations: int, gen: torch.Generator
) -> list[Tensor | None]:
    """Per chunk, the sampled output positions ``(j − i, locations)`` (CPU, long), drawn from
    ``gen`` chunk by chunk; None where every position is used (p ≤ locations)."""
    if p <= locations:
        return [None] * len(chunks)
    return [torch.rand(j - i, p, generator=gen).topk(locations, dim=1).indices for i, j in chunks]


def _pick(t: Tensor, pick: Tensor | None) -> Tensor:
    """``t`` ``(c, F, P)`` at the positions ``pick`` ``(c, m)`` → ``(c, F, m)``."""
    if pick is None:
        return t
    index = pick.to(t.device)[:, None, :]
    return t.gather(2, index.expand(-1, t.shape[1], -1))


def _conv_targets(
    y: Tensor, chunks: Sequence[tuple[int, int]], picks: Sequence[Tensor | None]
) -> list[Tensor]:
    """The target ``(b, O, *out_spatial)`` per chunk at its sampled positions ``(c, O, m)``."""
    flat = y.flatten(2)
    return [_pick(flat[i:j], pick) for (i, j), pick in zip(chunks, picks, strict=True)]


def _conv_rows(
    conv: nn.Conv1d | nn.Conv2d,
    x: Tensor,
    targets: Sequence[Tensor],
    chunks: Sequence[tuple[int, int]],
    picks: Sequence[Tensor | None],
    p: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Rows ``(m, C·kh·kw)`` of input patches and ``(m, O)`` of outputs at sampled positions.

    ``x``: the layer's input ``(b, C, *spatial)``; ``targets``: per chunk of ``chunks``, the
    outputs ``(c, O, m)`` at the positions ``picks`` (:func:`_conv_targets`); ``p``: the
    number of output positions P of the original layer.
    """
    x = F.pad(x, tuple(conv._reversed_padding_repeated_twice))
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, d = (1, *k), (1, *s), (1, *d)
    feats = x.shape[1] * k[0] * k[1]
    for (i, j), pick, t in zip(chunks, picks, targets, strict=True):
        patches = F.unfold(x[i:j], k, dilation=d, stride=s)  # (c, D, P)
        if patches.shape[2] != p:
            raise MippError(
                f"{type(conv).__name__}: {patches.shape[2]} input patches but {p} output "
                f"positions in the original network; the layers' geometries differ"
            )
        patches = _pick(patches, pick)
        yield patches.transpose(1, 2).reshape(-1, feats), t.transpose(1, 2).reshape(-1, t.shape[1])


def _kept_part(layer: nn.Module, y: Tensor, kept: Tensor) -> Tensor:
    """The original layer's output ``y`` at the kept output units: the last dimension of a
    Linear's ``(b, ..., O)``, the channel dimension of a convolution's ``(b, O, *spatial)``."""
    return y.index_select(-1 if isinstance(layer, nn.Linear) else 1, kept.to(y.device))


def _skip_reason(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}) is not supported"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
    return None


def _add_batch(
    ne: _NormalEquations,
    layer: nn.Module,
    inp: Tensor,
    tgt: Tensor | list[Tensor],
    plan: tuple[list[tuple[int, int]], list[Tensor | None], int] | None,
) -> None:
    """Add one batch's rows: ``inp`` the pruned layer's input; ``tgt`` the target
    ``(b, ..., O)`` (Linear) or its chunks at the sampled positions (conv, with ``plan`` =
    (chunks, picks, P))."""
    if plan is None:
        ne.add(inp.reshape(-1, ne.features), tgt.reshape(-1, tgt.shape[-1]))
    else:
        chunks, picks, p = plan
        for xr, yr in _conv_rows(layer, inp, tgt, chunks, picks, p):
            ne.add(xr, yr)


# ----------------------------------------------------------------------------- per-layer path


def _fit_layer(
    name: str,
    original: nn.Module,
    pruned: nn.Module,
    x: Samples,
    kept: Tensor,
    *,
    ridge: float,
    locations: int,
    batch_size: int,
    gen: torch.Generator,
) -> LayerFit:
    """Fit one layer, running both networks as far as it for every batch."""
    orig = dict(original.named_modules())[name]
    layer = dict(pruned.named_modules())[name]
    ne = _accumulator(layer)
    dev_orig = _device(original, x.device)
    dev_mine = _device(pruned, x.device)
    with (
        forward_until(original, orig, record="output") as target_of,
        forward_until(pruned, layer, record="input") as input_of,
    ):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            inp = input_of(xb.to(dev_mine))
            tgt = _kept_part(orig, target_of(xb.to(dev_orig)), kept).to(inp.device)
            if isinstance(layer, nn.Linear):
                _add_batch(ne, layer, inp, tgt, None)
            else:
                p = tgt.flatten(2).shape[2]
                chunks = _chunks(len(inp), ne.features, p)
                picks = _draw(chunks, p, locations, gen)
                targets = _conv_targets(tgt, chunks, picks)
                _add_batch(ne, layer, inp, targets, (chunks, picks, p))
    return _solve(name, layer, ne, ridge)


def _per_layer(
    original: nn.Module,
    pruned: nn.Module,
    x: Samples,
    names: Sequence[str],
    kept: Mapping[str, Tensor],
    *,
    ridge: float,
    locations: int,
    batch_size: int,
    gen: torch.Generator,
    announce: Callable[[LayerFit], None],
) -> list[LayerFit]:
    mine = dict(pruned.named_modules())
    fits = []
    for name in names:
        layer = mine[name]
        reason = _skip_reason(layer)
        if reason is not None:
            fit = _skipped(name, layer, reason)
        else:
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
        announce(fit)
        fits.append(fit)
    return fits


def _skipped(name: str, layer: nn.Module, reason: str) -> LayerFit:
    return LayerFit(
        name, 0, layer.weight[0].numel(), _out_width(layer), math.nan, math.nan, skipped=reason
    )


# ----------------------------------------------------------------------------- single pass


class _Stop(Exception):
    """Ends a forward early from a hook (the original's pass, a worker told to stop)."""


@dataclass
class _ConvPlan:
    """A convolution's sampled positions, drawn before any forward: ``p`` output positions
    per image; per batch, its unfold chunks and each chunk's picks (None: all p)."""

    p: int
    chunks: list[list[tuple[int, int]]]
    picks: list[list[Tensor | None]]

    def of(self, b: int) -> tuple[list[tuple[int, int]], list[Tensor | None], int]:
        return self.chunks[b], self.picks[b], self.p


def _plan_positions(
    layers: Mapping[str, nn.Module],
    shapes: Mapping[str, torch.Size],
    sizes: Sequence[int],
    locations: int,
    gen: torch.Generator,
) -> dict[str, _ConvPlan]:
    """Every convolution's positions, drawn layer by layer (forward order), then batch by batch
    (``sizes``: the batch lengths), then chunk by chunk — the per-layer path's order."""
    plans = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear):
            continue
        p = math.prod(shapes[name][2:])
        features = layer.weight[0].numel()
        chunks = [_chunks(b, features, p) for b in sizes]
        plans[name] = _ConvPlan(p, chunks, [_draw(c, p, locations, gen) for c in chunks])
    return plans


def _record_targets(
    original: nn.Module,
    x: Samples,
    layers: Mapping[str, nn.Module],
    kept: Mapping[str, Tensor],
    plans: Mapping[str, _ConvPlan],
    bounds: Sequence[tuple[int, int]],
    device: torch.device,
) -> dict[str, list]:
    """One pass of ``original`` over the batches ``bounds`` of ``x``.

    Per layer, per batch: the first call's output at the kept indices, ``(b, ..., O)`` for
    Linear, per unfold chunk ``(c, O, m)`` at the planned positions for convolutions — on
    ``device``. Each forward stops once every layer has run.
    """
    targets: dict[str, list] = {name: [] for name in layers}
    seen: set[str] = set()
    current = [0]

    def make(name: str):
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            if name in seen:
                return
            seen.add(name)
            if not isinstance(out, Tensor):
                raise MippError(f"{type(mod).__name__} returned {type(out).__name__}, not a tensor")
            y = _kept_part(mod, out.detach(), kept[name]).to(device)
            plan = plans.get(name)
            if plan is not None:
                if y.flatten(2).shape[2] != plan.p:
                    raise MippError(
                        f"layer {name!r}: {y.flatten(2).shape[2]} output positions in the "
                        f"original network but {plan.p} in the pruned one; the layers' "
                        f"geometries differ"
                    )
                chunks, picks, _ = plan.of(current[0])
                y = _conv_targets(y, chunks, picks)
            targets[name].append(y)
            if len(seen) == len(layers):
                raise _Stop

        return hook

    dev = _device(original, x.device)
    handles = []
    with eval_mode(original), torch.no_grad():
        try:
            for name, module in layers.items():
                handles.append(module.register_forward_hook(make(name)))
            for b, (i, j) in enumerate(bounds):
                seen.clear()
                current[0] = b
                with contextlib.suppress(_Stop):
                    x[i:j].to(dev).run(original)
                missing = [n for n in layers if n not in seen]
                if missing:
                    raise MippError(
                        f"layer {missing[0]!r} did not run in the forward pass of "
                        f"{type(original).__name__} (the original model); it cannot be captured"
                    )
        finally:
            for h in handles:
                h.remove()
    return targets


def _caller_state() -> Callable[[], contextlib.AbstractContextManager]:
    """Re-enters, in a worker thread, the calling thread's thread-local settings that a forward
    may depend on (the per-layer path runs in the caller's thread and sees them): autocast
    per device type, the default device (``torch.set_default_device`` / ``with
    torch.device(...)``) and the current CUDA device."""
    active = []
    for device_type in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device_type):
                active.append((device_type, torch.get_autocast_dtype(device_type)))
        except (AttributeError, RuntimeError, TypeError):  # older torch / unknown device type
            continue
    get_default = getattr(torch, "get_default_device", None)
    default = get_default() if get_default is not None else None
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if cuda is not None:
            stack.enter_context(torch.cuda.device(cuda))
        if default is not None and default != torch.device("cpu"):
            stack.enter_context(torch.device(default))
        for device_type, dtype in active:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        return stack

    return enter


class _Worker:
    """One batch's forward in its own thread (see :func:`_lockstep`)."""

    def __init__(self, x: Samples) -> None:
        self.x = x
        self.resume = threading.Semaphore(0)
        self.stop = False
        self.seen: set[str] = set()
        self.thread: threading.Thread | None = None
        self.finished = False


@contextlib.contextmanager
def _lockstep(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Samples], device
) -> Iterator[Callable[[int], tuple[str, Tensor] | None]]:
    """Within the block, ``advance(b)`` runs batch b's forward through ``model`` on to the
    first call of the next of ``layers`` and returns ``(name, input)`` (the forward waits
    there, before the layer runs), or None when its forward ended without reaching one.

    Every batch's forward runs in its own thread (no grad, :func:`_caller_state`), and only
    one runs at a time: ``advance`` waits until the resumed forward arrives. An exception
    in a forward is raised by ``advance``. On exit every waiting forward is stopped, its
    thread joined, and the hooks removed, even on error.
    """
    local = threading.local()
    reports: queue.SimpleQueue = queue.SimpleQueue()
    workers = [_Worker(xb) for xb in batches]
    state = _caller_state()

    def make(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            w = getattr(local, "worker", None)
            if w is None or name in w.seen:
                return
            w.seen.add(name)
            if w.stop:
                raise _Stop
            reports.put(("layer", name, args[0].detach()))
            w.resume.acquire()
            if w.stop:
                raise _Stop

        return hook

    def body(w: _Worker) -> None:
        local.worker = w
        try:
            with torch.no_grad(), state():
                w.x.to(device).run(model)
            reports.put(("end", None, None))
        except _Stop:
            reports.put(("stopped", None, None))
        except BaseException as e:  # handed to the controlling thread
            reports.put(("error", None, e))

    def advance(b: int) -> tuple[str, Tensor] | None:
        w = workers[b]
        if w.finished:
            return None
        if w.thread is None:
            w.thread = threading.Thread(
                target=body, args=(w,), name=f"mipp-compensation-{b}", daemon=True
            )
            w.thread.start()
        else:
            w.resume.release()
        kind, name, payload = reports.get()
        if kind == "layer":
            return name, payload
        w.finished = True
        if kind == "error":
            raise payload
        return None

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make(name)))
        yield advance
    finally:
        for w in workers:
            if w.thread is not None:
                if not w.finished:
                    w.stop = True
                    w.resume.release()
                w.thread.join()
        for h in handles:
            h.remove()
        while not reports.empty():
            reports.get()


def _single_pass(
    original: nn.Module,
    pruned: nn.Module,
    x: Samples,
    names: Sequence[str],
    kept: Mapping[str, Tensor],
    probe: _Probe,
    *,
    ridge: float,
    locations: int,
    batch_size: int,
    gen: torch.Generator,
    announce: Callable[[LayerFit], None],
) -> list[LayerFit]:
    orig = dict(original.named_modules())
    mine = dict(pruned.named_modules())
    reasons = {name: _skip_reason(mine[name]) for name in names}
    todo = [name for name in names if reasons[name] is None]
    bounds = [(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
    dev_mine = _device(pruned, x.device)
    targets: dict[str, list] = {}
    plans: dict[str, _ConvPlan] = {}
    if todo:
        plans = _plan_positions(
            {n: mine[n] for n in todo}, probe.shapes, [j - i for i, j in bounds], locations, gen
        )
        targets = _record_targets(
            original, x, {n: orig[n] for n in todo}, kept, plans, bounds, dev_mine
        )
    fits = []
    batches = [x[i:j] for i, j in bounds]
    with eval_mode(pruned), _lockstep(pruned, {n: mine[n] for n in todo}, batches, dev_mine) as go:
        for name in names:
            layer = mine[name]
            if reasons[name] is not None:
                fit = _skipped(name, layer, reasons[name])
            else:
                ne = _accumulator(layer)
                plan = plans.get(name)
                for b in range(len(bounds)):
                    arrived = go(b)
                    if arrived is None:
                        raise MippError(
                            f"layer {name!r} did not run in the forward pass of batch {b} "
                            f"through {type(pruned).__name__}; it cannot be captured"
                        )
                    if arrived[0] != name:
                        raise MippError(
                            f"the forward pass of batch {b} reached layer {arrived[0]!r} before "
                            f"{name!r}, unlike the probe's order; the single pass needs the "
                            f"same layer order in every batch: use path='per-layer'"
                        )
                    tgt = targets[name][b]
                    targets[name][b] = None
                    _add_batch(ne, layer, arrived[1], tgt, None if plan is None else plan.of(b))
                    del arrived, tgt
                targets.pop(name)
                fit = _solve(name, layer, ne, ridge)
            announce(fit)
            fits.append(fit)
    return fits


def _single_pass_bytes(
    probe: _Probe,
    layers: Mapping[str, nn.Module],
    n: int,
    locations: int,
    element_size: int,
) -> int:
    """Estimated memory of the single pass: the probe's live activations per sample × n, plus
    the targets and sampled positions it keeps (see the module docstring)."""
    total = n * probe.live
    for name, layer in layers.items():
        if _skip_reason(layer) is not None:
            continue
        shape = probe.shapes.get(name)
        if shape is None:
            continue
        if isinstance(layer, nn.Linear):
            total += n * math.prod(shape[1:]) * element_size
        else:
            p = math.prod(shape[2:])
            m = min(p, locations)
            total += n * m * _out_width(layer) * element_size + (n * m * 8 if p > m else 0)
    return total


def _free_bytes(device: torch.device) -> int | None:
    """Memory free now on ``device``: CUDA's free memory, Linux's MemAvailable; else None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


# ----------------------------------------------------------------------------- entry point


def compensate(
    original: nn.Module,
    pruned: nn.Module,
    x: Tensor | Samples,
    *,
    kept_out: Mapping[str, Sequence[int]],
    layers: Sequence[str] | None = None,
    ridge: float = 1e-2,
    locations: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    path: str = "auto",
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
) -> list[LayerFit]:
    """Re-fit the consumers of pruned units of ``pruned`` in place (see the module docstring).

    Args:
        original: the unpruned network (only run, never changed).
        pruned: the network after removal (``original`` with units deleted; same module
            names). Its layers' weights and biases are overwritten in place.
        x: calibration inputs ``(n, *input_shape)`` or :class:`~mipp.inputs.Samples` (inputs
            of any form and the ``forward`` that runs them); batches are moved to each
            model's device.
        kept_out: layer name → the original output indices that layer kept, for every layer
            whose output units were pruned (each group's producers keep the group's kept
            units). Layers not in it kept all outputs.
        layers: names of the layers to re-fit (Conv1d/Conv2d/Linear, present in both models).
            Default: every such layer of ``pruned`` whose input width differs from the
            original's — the consumers of pruned groups. They are always fitted in forward
            order (of their first call; a layer called more than once is fitted on its
            first call's input and output).
        ridge: relative ridge penalty, λ = ridge · (mean diagonal of Σ x xᵀ); finite, >= 0.
        locations: output positions sampled per image for convolutions, >= 1.
        batch_size: calibration samples per forward pass, >= 1.
        seed: seeds the position sampling (a private ``torch.Generator``).
        path: ``"single-pass"`` (cost linear in depth; memory ≈ one forward at batch n
            plus the targets), ``"per-layer"`` (quadratic in depth; memory of one batch) or
            ``"auto"``: the single pass when its estimate fits ``memory_budget``. Both give
            the same weights (see the module docstring). The single pass runs the pruned
            model's forwards in worker threads (grad off; the caller's autocast, default
            device and CUDA device re-entered); a model whose forward depends on other
            thread-local state, or runs its layers in a different order for different
            batches, needs ``"per-layer"``.
        memory_budget: bytes the single pass may use under ``path="auto"``, estimated as
            n × (activations alive per sample where the forward pauses, measured on one
            sample) + targets. None: half of the memory free on the pruned model's device
            now (CUDA's free memory; Linux's MemAvailable for CPU; no limit where unknown).
        progress: receives one ``"compensation"`` event per layer (also logged); its fields
            are the :class:`LayerFit`'s and ``path``, the path taken.

    Returns:
        One :class:`LayerFit` per layer, in the order fitted. Layers with ``groups != 1`` or
        a non-zero ``padding_mode`` are skipped with the reason, not fitted.

    Raises:
        ValueError: a bad option (the message names it and what is valid).
        MippError: a layer name missing from either model, or ``kept_out`` inconsistent with
            the layer widths.
    """
    _check_options(x, ridge, locations, batch_size, seed, path, memory_budget)
    x = as_samples(x)
    if original is pruned:
        raise ValueError("original and pruned must be different modules (deepcopy before pruning)")
    chosen = _select_layers(original, pruned, layers)
    if not chosen:
        return []
    probe = _probe(pruned, x[:1], chosen)
    missing = [n for n in chosen if n not in probe.order]
    if missing and layers is not None:
        raise MippError(f"layers {missing} did not run in the pruned model's forward pass")
    names = probe.order
    orig = dict(original.named_modules())
    mine = dict(pruned.named_modules())
    unknown = [n for n in kept_out if n not in orig or n not in mine]
    if unknown:
        raise MippError(
            f"kept_out names layers missing from the original or pruned model: {unknown}"
        )
    kept = {n: _kept_index(n, orig[n], mine[n], kept_out) for n in names}
    chosen_path = path
    if path == "auto":
        dev = _device(pruned, x.device)
        budget = memory_budget
        if budget is None:
            free = _free_bytes(dev)
            budget = None if free is None else free // 2
        param = next(original.parameters(), None)
        size = x.tensors[0].element_size() if param is None else param.element_size()
        need = _single_pass_bytes(probe, {n: mine[n] for n in names}, len(x), locations, size)
        chosen_path = "single-pass" if budget is None or need <= budget else "per-layer"
        if chosen_path == "per-layer":
            _log.info(
                "compensation: the single pass would need about %.3g GB (budget %.3g GB); "
                "fitting layer by layer instead",
                need / 1e9,
                budget / 1e9,
            )
    report = Reporter(progress, __name__)

    def announce(fit: LayerFit) -> None:
        if fit.skipped:
            report(
                "compensation",
                f"compensation: {fit.layer} skipped ({fit.skipped})",
                layer=fit.layer,
                path=chosen_path,
            )
        else:
            note = " (fewer rows than features)" if fit.rows < fit.features else ""
            report(
                "compensation",
                f"compensation: {fit.layer}: {fit.rows} rows × {fit.features} features → "
                f"{fit.outputs} outputs, error {fit.error_before:.4g} → {fit.error_after:.4g}"
                + note,
                **dataclasses.asdict(fit),
                path=chosen_path,
            )

    gen = torch.Generator().manual_seed(seed)
    run = _single_pass if chosen_path == "single-pass" else _per_layer
    extra = {"probe": probe} if run is _single_pass else {}
    return run(
        original,
        pruned,
        x,
        names,
        kept,
        ridge=ridge,
        locations=locations,
        batch_size=batch_size,
        gen=gen,
        announce=announce,
        **extra,
    )


# ----------------------------------------------------------------------------- BatchNorm


def recalibrate_bn(model: nn.Module, x: Tensor | Samples, *, batch_size: int = 256) -> int:
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
    x = as_samples(x)
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
                x[a:b].to(device).run(model)
        _merge_ranks(bns)
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


def _merge_ranks(bns: Sequence[nn.Module]) -> None:
    """Under ``torch.distributed``, every rank's cumulative BatchNorm statistics become the
    average over all the ranks' batches (each rank's weighted by its batch count), as one
    process running every rank's batches would give; a no-op without a process group."""
    if not distributed.active() or not bns:
        return
    counts = [bn.num_batches_tracked.to(torch.float64).reshape(1) for bn in bns]
    weighted = []
    for bn, c in zip(bns, counts, strict=True):
        weighted += [bn.running_mean.to(torch.float64) * c, bn.running_var.to(torch.float64) * c]
    distributed.all_reduce_([*counts, *weighted])
    with torch.no_grad():
        for k, bn in enumerate(bns):
            total = counts[k].clamp_min(1.0)
            bn.running_mean.copy_((weighted[2 * k] / total).to(bn.running_mean.device))
            bn.running_var.copy_((weighted[2 * k + 1] / total).to(bn.running_var.device))
            bn.num_batches_tracked.fill_(int(counts[k]))


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
        kept = [j for j in range(g.size) if j not in gone]
        for p in [*g.producers, *g.channelwise]:
            out[p] = g.channels(kept, p if p in g.producer_index else None)
    return out


def finish(
    original: nn.Module,
    pruned: nn.Module,
    structure: ModelStructure,
    removed: Mapping[str, Sequence[int]],
    x: Tensor | Samples,
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
