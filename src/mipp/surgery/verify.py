"""Checking a removal: the pruned model must be the original with exactly its removed units
switched off.

The *masked reference* of a removal is the unpruned model in which every consumer weight
reading a removed unit is zero (:func:`zero_consumer_inputs`). That is what removal means:
a removed unit contributes nothing to any consumer — for a convolution followed by BatchNorm
the whole normalised output of the channel, its BatchNorm shift included, is gone — while
every kept unit reaches every consumer exactly as before. Zeroing at the producer instead
would not be the same: the BatchNorm shift and a nonlinearity with f(0) ≠ 0 still pass
something on.

:func:`verify_removal` runs a few samples through the pruned model and through the masked
reference and compares the outputs. A structural backend that maps channels wrongly (a
parameter-free reordering such as ``flip``, ``roll`` or a channel shuffle between two layers
is invisible to Torch-Pruning) gives a model that computes something else; the check turns
that into a :class:`~mipp.errors.PruningVerificationError` naming the group, found by
comparing what every layer reads in the two models, in forward order.

Tolerance: ``max |y_pruned − y_ref| ≤ rtol · max |y_ref|`` over all outputs, with
``rtol = 1e-4`` for 32- and 64-bit floats and ``1e-2`` for 16-bit ones (:func:`rtol`).
Removal and masking compute the same sums, with and without zero terms, so they differ only
by round-off (measured around 1e-7 relative in float32 on the zoo), while a wrong channel
mapping changes outputs on the scale of the outputs themselves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mipp.errors import PruningVerificationError
from mipp.inputs import Samples, as_samples
from mipp.modules import eval_mode
from mipp.surgery.capture import normalise_kept, record_first_inputs
from mipp.surgery.layers import norm_width, renormalises, zero_inputs
from mipp.surgery.structure import ModelStructure, UnitGroup

__all__ = [
    "VERIFY_SAMPLES",
    "mismatch",
    "rtol",
    "tolerance",
    "verify_removal",
    "zero_consumer_inputs",
]

#: samples :func:`mipp.prune` runs through both models to verify a removal
VERIFY_SAMPLES = 8


def rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the verification for outputs of ``dtype``: 1e-4, or 1e-2 for
    16-bit floats (float16, bfloat16), whose own round-off is about 1e-3."""
    return 1e-2 if dtype.is_floating_point and torch.finfo(dtype).bits <= 16 else 1e-4


def renormalised(
    model: nn.Module, structure: ModelStructure, removed: Mapping[str, Sequence[int]]
) -> contextlib.AbstractContextManager:
    """A context in which ``model``'s LayerNorms and GroupNorms that span removed channels
    normalise over the kept channels only (:func:`mipp.surgery.capture.normalise_kept`):
    with :func:`zero_consumer_inputs`, the masked reference of a removal through them."""
    modules = dict(model.named_modules())
    keep: dict[str, list[int]] = {}
    for g in structure.groups:
        gone = {int(j) for j in removed.get(g.name, ())}
        if not gone:
            continue
        for name, index in g.norm_index.items():
            if renormalises(modules[name]):
                dropped = {c for j in gone for c in index[j]}
                keep[name] = [c for c in range(norm_width(modules[name])) if c not in dropped]
    return normalise_kept(model, keep)


def zero_consumer_inputs(
    model: nn.Module, structure: ModelStructure, removed: Mapping[str, Sequence[int]]
) -> None:
    """Make ``model`` the masked reference of a removal, in place: every consumer weight
    reading a removed unit (``removed[group name]``: unit indices) becomes zero.

    ``structure`` is the one the removal used (built on an unpruned copy with the same
    module names); ``model`` must still be unpruned.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in structure.groups:
            units = removed.get(g.name, ())
            for c in g.consumers:
                cols = [i for j in units for i in c.index[j]]
                if cols:
                    zero_inputs(modules[c.layer], cols)


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out, key=str) for t in _tensors(out[k])]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return []


def _diff(got: Tensor, want: Tensor) -> Tensor:
    """``|got − want|`` in float64; 0 where both are equal or both NaN, NaN → Inf."""
    a, b = got.detach().double(), want.detach().double()
    diff = (a - b).abs()
    diff[(a == b) | (a.isnan() & b.isnan())] = 0
    return diff.nan_to_num(math.inf, posinf=math.inf)


def tolerance(want: Tensor) -> float:
    """``rtol(want.dtype) · max |want|`` over the finite entries of the reference."""
    finite = want[torch.isfinite(want)] if want.is_floating_point() else want
    return rtol(want.dtype) * (float(finite.abs().max()) if finite.numel() else 0.0)


def mismatch(got: Tensor, want: Tensor) -> tuple[float, float] | None:
    """``(max |got − want|, tolerance)`` when ``got`` is not ``want`` within
    :func:`tolerance` (a shape mismatch counts as an infinite difference; NaN or Inf must
    sit in the same places); ``None`` when they agree."""
    tol = tolerance(want)
    if got.shape != want.shape:
        return math.inf, tol
    if not want.numel():
        return None
    worst = float(_diff(got, want).max())
    return None if worst <= tol else (worst, tol)


def verify_removal(
    reference: nn.Module,
    pruned: nn.Module,
    structure: ModelStructure,
    removed: Mapping[str, Sequence[int]],
    x: Tensor | Samples,
) -> None:
    """Check that ``pruned`` is ``reference`` with exactly the units ``removed`` removed.

    Args:
        reference: an unpruned copy of the model the removal started from; it is turned
            into the masked reference in place (:func:`zero_consumer_inputs`) — pass a copy.
        pruned: the model after :meth:`ModelStructure.remove`.
        structure: the structure the removal used (its unit → input-index records).
        removed: group name → removed unit indices.
        x: a few inputs (:data:`VERIFY_SAMPLES` in :func:`mipp.prune`), a tensor or
            :class:`~mipp.inputs.Samples`; the outputs compared are what ``Samples.run``
            returns.

    Raises:
        PruningVerificationError: the outputs differ by more than the tolerance (module
            docstring); the message names the first group, in forward order, whose units
            the pruned model reads differently, and how to exclude it.
    """
    zero_consumer_inputs(reference, structure, removed)
    x = as_samples(x)
    with (
        eval_mode(reference),
        eval_mode(pruned),
        torch.no_grad(),
        renormalised(reference, structure, removed),
    ):
        want = _tensors(x.run(reference))
        try:
            got = _tensors(x.run(pruned))
        except Exception as e:  # a wrong mapping can also break shapes
            raise PruningVerificationError(
                _locate(reference, pruned, structure, removed, x, (math.inf, 0.0))
            ) from e
        worst: tuple[float, float] | None = None
        if len(got) != len(want):
            worst = (math.inf, 0.0)
        for g, w in zip(got, want, strict=False):
            bad = mismatch(g, w)
            if bad is not None and (worst is None or bad[0] > worst[0]):
                worst = bad
        if worst is not None:
            raise PruningVerificationError(_locate(reference, pruned, structure, removed, x, worst))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _locate(
    reference: nn.Module,
    pruned: nn.Module,
    structure: ModelStructure,
    removed: Mapping[str, Sequence[int]],
    x: Samples,
    worst: tuple[float, float],
) -> str:
    """The message: the first layer whose input differs (or that the pruned model no longer
    reaches), and the group it reads there."""
    ref_modules, new_modules = dict(reference.named_modules()), dict(pruned.named_modules())
    layers = [n for n in structure.order if n in ref_modules and n in new_modules]
    want, _ = record_first_inputs(reference, x, {n: ref_modules[n] for n in layers})
    got, error = record_first_inputs(pruned, x, {n: new_modules[n] for n in layers})
    pruned_groups = [g.name for g in structure.groups if removed.get(g.name)]

    def kind(layer: str) -> str:
        return type(ref_modules[layer]).__name__

    for layer in layers:
        if layer not in want:
            continue
        owner: dict[int, str] = {}
        gone: set[int] = set()
        for gname, consumer in structure.readers.get(layer, []):
            units = set(removed.get(gname, ()))
            for j, index in enumerate(consumer.index):
                for i in index:
                    owner[i] = gname
                    if j in units:
                        gone.add(i)
        read = list(dict.fromkeys(owner.values()))
        if layer not in got:  # the pruned forward failed before reaching this layer
            names = [n for n in read if removed.get(n)] or read
            if not names:
                continue
            what = f"the pruned model fails before reaching {layer!r} ({kind(layer)})" + (
                f" ({_first_line(error)})" if error else ""
            )
            return _message(structure.group(names[0]), layer, what)
        r, p = want[layer], got[layer]
        dim = r.ndim - 1 if isinstance(ref_modules[layer], nn.Linear) else 1
        kept = [i for i in range(r.shape[dim]) if i not in gone]
        r = r.index_select(dim, torch.tensor(kept, dtype=torch.long, device=r.device))
        diff = mismatch(p, r)
        if diff is None:
            continue
        if r.shape != p.shape:
            bad_cols = kept
        else:
            per_col = _diff(p, r).movedim(dim, 0).reshape(len(kept), -1).amax(1)
            bad_cols = [kept[k] for k in (per_col > diff[1]).nonzero().flatten().tolist()]
        names = list(dict.fromkeys(owner[i] for i in bad_cols if i in owner))
        names = [n for n in names if removed.get(n)] or names
        if not names:
            continue
        what = (
            f"the pruned {layer!r} ({kind(layer)}) reads its units differently from the "
            f"original with the removed units switched off (max difference {diff[0]:.3g}, "
            f"tolerance {diff[1]:.3g})"
        )
        return _message(structure.group(names[0]), layer, what)
    if error is not None:
        failure = f"the pruned model fails ({_first_line(error)})"
    else:
        failure = (
            f"the pruned model's output differs from the original with the removed units "
            f"switched off (max difference {worst[0]:.3g}, tolerance {worst[1]:.3g})"
        )
    return (
        f"{failure}; pruned groups: {', '.join(pruned_groups) or 'none'} — prune with "
        f"exclude=[...] naming them one at a time to find the one mapped wrongly"
    )


def _message(g: UnitGroup, layer: str, what: str) -> str:
    return (
        f"group {g.name!r} was removed with a wrong channel mapping: {what}, as after a "
        f"parameter-free channel reordering (flip, roll, channel shuffle, index_select) "
        f"between {', '.join(g.producers)} and {layer!r}; prune with exclude=[{g.name!r}] to "
        f"leave it unpruned"
    )
