"""The calibration set every pruning method shares: inputs and, when known, labels.

What ``data`` may be (:func:`calibration_inputs`; the same list is in :func:`mipp.prune`):

- an :class:`~mipp.zoo.data.ImageDataset`;
- a tensor or numpy array of inputs ``(n, ...)``;
- a pair ``(inputs, labels)`` (a tuple) of tensors or numpy arrays of the same length;
- an iterable of batches (a list, a ``DataLoader``, a generator): each an input tensor or
  array ``(b, ...)``, or a tuple / list ``(inputs, labels, ...)``;
- an iterable of per-sample pairs ``(x_i, y_i)`` with a scalar label (``list(zip(x, y))``,
  a map-style dataset's items): the samples are stacked.

Bare tensors in an iterable are always read as batches: a list of per-sample tensors cannot
be told from a list of batches without the model, so stack it yourself (``torch.stack``)
or pair each sample with its label. Anything else — a dict, a string, a batch of another
type, batches whose samples differ in shape — raises :class:`~mipp.errors.CalibrationError`
naming what was found.

Checks on the result: inputs are real numbers with a batch dimension and at least one more,
all finite; integer inputs (e.g. uint8 images in 0..255) are converted to float32 with a
:class:`UnscaledInputWarning` (once per call) when they exceed 1, since models are trained on
scaled inputs; and the set must not be *degenerate* (:func:`degenerate_reason`) unless
``allow_degenerate=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mipp.errors import CalibrationError
from mipp.zoo.data import ImageDataset, calibration_subset

__all__ = ["UnscaledInputWarning", "calibration_inputs", "degenerate_reason"]


class UnscaledInputWarning(UserWarning):
    """Integer inputs (e.g. uint8 images in 0..255) were given where a model expects scaled
    floats; they are converted to float32 as they are."""


def _type(value: Any) -> str:
    """``dict``, ``str``, ``numpy.ndarray``, ``pandas.DataFrame``: a value's type by name."""
    kind = type(value)
    package = kind.__module__.split(".")[0]
    return kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"


def _array(value: Any, what: str) -> Tensor:
    """A tensor of a tensor or numpy array; anything else is refused by type."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (
            np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
        ):
            raise CalibrationError(f"{what} is a numpy array of {value.dtype}; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CalibrationError(f"{what} must be a tensor or numpy array, got {_type(value)}")


def _is_array(value: Any) -> bool:
    return isinstance(value, Tensor | np.ndarray)


def _scalar_label(value: Any) -> bool:
    """A per-sample label: a Python / numpy number or a 0-dim tensor / array."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return _is_array(value) and value.ndim == 0


def _from_iterable(data: Iterable[Any], n: int) -> tuple[Tensor, Tensor | None]:
    parts: list[Tensor] = []
    labels: list[Tensor] = []
    samples: list[Tensor] = []
    sample_labels: list[Any] = []
    count = 0
    for k, item in enumerate(data):
        if isinstance(item, tuple | list) and len(item) >= 2 and _scalar_label(item[1]):
            if parts:
                raise CalibrationError(
                    f"item {k} of the calibration data is a per-sample (input, label) pair but "
                    f"earlier items are batches; give one kind"
                )
            samples.append(_array(item[0], f"the input of calibration item {k}"))
            sample_labels.append(item[1])
            count += 1
        elif _is_array(item) or (isinstance(item, tuple | list) and item and _is_array(item[0])):
            if samples:
                raise CalibrationError(
                    f"item {k} of the calibration data is a batch but earlier items are "
                    f"per-sample (input, label) pairs; give one kind"
                )
            x = _array(item if _is_array(item) else item[0], f"calibration batch {k}")
            if x.ndim == 0:
                raise CalibrationError(
                    f"calibration batch {k} is a single number; batches are (b, ...) arrays"
                )
            if parts and x.shape[1:] != parts[0].shape[1:]:
                raise CalibrationError(
                    f"calibration batch {k} holds inputs of shape {tuple(x.shape[1:])}, "
                    f"batch 0 of shape {tuple(parts[0].shape[1:])}; all must match"
                )
            parts.append(x)
            if not _is_array(item) and len(item) > 1 and _is_array(item[1]):
                y = _array(item[1], f"the labels of calibration batch {k}")
                if y.ndim == 0 or len(y) != len(x):
                    raise CalibrationError(
                        f"calibration batch {k} has {len(x)} inputs but labels of shape "
                        f"{tuple(y.shape)}; give one label per input"
                    )
                labels.append(y)
            count += len(x)
        else:
            what = (
                f"a {type(item).__name__} of {len(item)} item(s) starting with a {_type(item[0])}"
                if isinstance(item, tuple | list) and item
                else _type(item)
            )
            raise CalibrationError(
                f"calibration item {k} is {what}; each item must be a batch (a tensor or numpy "
                f"array, or a tuple (inputs, labels)) or a per-sample pair (input, label)"
            )
        if count >= n:
            break
    if samples:
        shapes = {tuple(s.shape) for s in samples}
        if len(shapes) > 1:
            some = ", ".join(map(str, sorted(shapes)[:3]))
            raise CalibrationError(
                f"the per-sample calibration inputs differ in shape ({some}); all must match"
            )
        x = torch.stack(samples)[:n]
        try:
            y = torch.as_tensor(
                np.asarray([v.item() if _is_array(v) else v for v in sample_labels])
            )[:n]
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"the per-sample labels are not numbers: {e}") from None
        return x, y
    if not parts:
        return torch.empty(0), None
    x = torch.cat(parts)[:n]
    y = torch.cat(labels)[:n] if labels and len(labels) == len(parts) else None
    return x, y


def degenerate_reason(x: Tensor) -> str | None:
    """Why ``x`` is a degenerate calibration set, or None if it is not.

    The rule: with ``n >= 2`` samples, the set is degenerate when it holds a single distinct
    input (all zeros, one image repeated) or fewer distinct inputs than half the samples.
    On such a set every unit's activations are (nearly) constant, every estimated
    information is 0 and a pruning method removes units at random, or almost all of them.

    >>> degenerate_reason(torch.zeros(8, 3))
    'only 1 distinct input among 8 samples'
    >>> degenerate_reason(torch.randn(8, 3)) is None
    True
    """
    n = len(x)
    if n < 2:
        return None
    # distinct rows by a fixed random projection (O(n·d), no copy of x; two different rows
    # collide only if they differ below float64 resolution along it), not a row sort
    flat = x.reshape(n, -1)
    w = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = torch.cat([chunk.to(torch.float64) @ w.to(chunk.device) for chunk in flat.split(256)])
    distinct = int(torch.unique(keys).numel())
    if distinct == 1 or 2 * distinct < n:
        return f"only {distinct} distinct input{'s' if distinct > 1 else ''} among {n} samples"
    return None


def calibration_inputs(
    data: Any, n: int, *, seed: int, allow_degenerate: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The calibration inputs ``(n, *input_shape)`` and their labels (None if unknown).

    ``data``: one of the forms in the module docstring. An ImageDataset, an input tensor /
    array or a pair ``(inputs, labels)`` gives a seeded subset of ``n`` (all of it when it
    holds fewer); an iterable gives its first ``n`` samples.

    Raises:
        CalibrationError: ``data`` is of no accepted form (the message names its type), is
            empty, holds non-finite or non-numeric inputs, or is degenerate
            (:func:`degenerate_reason`) and ``allow_degenerate`` is False.

    Warns:
        UnscaledInputWarning: integer inputs with values above 1 (converted to float32).
    """
    y: Tensor | None = None
    if isinstance(data, ImageDataset):
        ds = calibration_subset(data, min(n, len(data)), seed=seed) if len(data) else data
        x, y = ds.x, ds.y
    elif _is_array(data) or (
        isinstance(data, tuple) and len(data) == 2 and all(_is_array(t) for t in data)
    ):
        if _is_array(data):
            x = _array(data, "the calibration inputs")
        else:
            x = _array(data[0], "the calibration inputs")
            y = _array(data[1], "the calibration labels")
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise CalibrationError(
                    f"the pair (inputs, labels) has inputs of shape {tuple(x.shape)} and labels "
                    f"of shape {tuple(y.shape)}; give one label per input"
                )
        if x.ndim == 0:
            raise CalibrationError("the calibration inputs are a single number; give (n, ...)")
        if len(x) > n:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(x), generator=gen)[:n].sort().values
            x = x[pick]
            y = None if y is None else y[pick]
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
        x, y = _from_iterable(data, n)
    else:
        raise CalibrationError(
            f"data must be an ImageDataset, a tensor or numpy array of inputs, a pair "
            f"(inputs, labels), an iterable of batches or of (input, label) pairs, got "
            f"{_type(data)}"
        )
    if len(x) == 0:
        raise CalibrationError("the calibration set is empty")
    return _checked(x, allow_degenerate=allow_degenerate), y


def _checked(x: Tensor, *, allow_degenerate: bool) -> Tensor:
    if x.ndim < 2:
        raise CalibrationError(
            f"calibration inputs need a batch dimension and a sample shape, e.g. (n, d) or "
            f"(n, c, h, w); got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise CalibrationError(f"calibration inputs of shape {tuple(x.shape)} hold no values")
    if x.dtype == torch.bool or x.is_complex():
        raise CalibrationError(f"calibration inputs must be real numbers, got {x.dtype}")
    if not x.is_floating_point():
        if int(x.max()) > 1:
            warnings.warn(
                f"calibration inputs are {str(x.dtype).removeprefix('torch.')} with values up "
                f"to {int(x.max())}: they are used unscaled; scale them as the model was "
                f"trained (e.g. x / 255, then normalise)",
                UnscaledInputWarning,
                stacklevel=4,
            )
        x = x.float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise CalibrationError(f"the calibration inputs hold {bad} NaN or infinite value(s)")
    reason = None if allow_degenerate else degenerate_reason(x)
    if reason is not None:
        raise CalibrationError(
            f"the calibration set is degenerate ({reason}): every unit would look "
            f"uninformative and be pruned at random; give varied inputs, or pass "
            f"allow_degenerate=True (mipp prune --allow-degenerate) to prune anyway"
        )
    return x


#: calibration samples :func:`constant_groups` runs through the model
CONSTANT_CHECK_SAMPLES = 64


def constant_groups(model: Any, x: Tensor, groups: Iterable[Any]) -> list[str]:
    """Names of the unit groups whose every unit is constant over the calibration samples.

    One forward of at most :data:`CONSTANT_CHECK_SAMPLES` samples of ``x`` records every
    consumer's input (unpooled). A unit is constant when each consumer's input columns it
    feeds differ across the samples by at most 4 rounding units of their dtype relative to
    their largest magnitude (exactly 0 for all-zero columns): the same arithmetic on equal
    values, not a small signal (a layer with tiny weights still varies). A group
    all of whose units are constant carries no information about anything on this data: MIPP
    would find every unit redundant and a data-based baseline would rank them at random.
    """
    from mipp.surgery.capture import record_first_inputs  # capture holds the forward hooks

    groups = list(groups)
    modules = dict(model.named_modules())
    layers = {c.layer: modules[c.layer] for g in groups for c in g.consumers}
    if len(x) < 2 or not layers:
        return []
    seen, error = record_first_inputs(model, x[:CONSTANT_CHECK_SAMPLES], layers)
    if error is not None:
        raise error
    out = []
    for g in groups:
        constant = True
        for c in g.consumers:
            inp = seen.get(c.layer)
            if inp is None:
                constant = False
                break
            eps = torch.finfo(inp.dtype).eps if inp.is_floating_point() else 0.0
            for idx in c.index:
                cols = inp[:, list(idx)].double()
                spread = (cols - cols[:1]).abs().max()
                # NaN compares False: non-finite columns are not "constant" (the statistics
                # pass then names the layer they come from)
                if not float(spread) <= 4 * eps * float(cols.abs().max()):
                    constant = False
                    break
            if not constant:
                break
        if constant:
            out.append(g.name)
    return out
