"""The calibration set every pruning method shares: inputs and, when known, labels.

What ``data`` may be (:func:`calibration_inputs`; the same list is in :func:`mipp.prune`).
*Inputs* are a tensor or numpy array ``(n, ...)``, a dict of them (keyword arguments:
``model(**inputs)``) or a tuple of them (positional arguments: ``model(*inputs)``), every
array with the same leading dimension n:

- an :class:`~mipp.zoo.data.ImageDataset`;
- inputs: a tensor or numpy array, or a dict of them;
- a pair ``(inputs, labels)`` (a tuple) with labels a tensor or numpy array of the same
  length, or None; a tuple (or list) of positional inputs comes only as the first element
  of a pair or of a batch, e.g. ``((ids, mask), None)``;
- an iterable of batches (a list, a ``DataLoader``, a generator): each an input tensor or
  array ``(b, ...)``, a dict of them, or a tuple / list ``(inputs, labels, ...)``;
- an iterable of per-sample pairs ``(x_i, y_i)`` with a scalar label (``list(zip(x, y))``,
  a map-style dataset's items): the samples (tensors, or dicts / tuples of them) are stacked.

Bare tensors in an iterable are always read as batches: a list of per-sample tensors cannot
be told from a list of batches without the model, so stack it yourself (``torch.stack``)
or pair each sample with its label. A tuple ``(a, b, ...)`` of arrays is always read as
``(inputs, labels, ...)``, as a ``DataLoader`` over a ``TensorDataset(x, y)`` gives it; give
several positional inputs as its first element, ``((a, b), labels)``. Every entry of a dict
goes to the model (a Hugging Face ``labels`` entry too); the labels of the loss-based methods
come from the pair forms. Anything else — a string, a batch of another type, batches whose
samples differ in shape or keys — raises :class:`~mipp.errors.CalibrationError` naming what
was found.

Checks on the result: every input has a batch dimension, one input (the only one, for a
bare tensor) has a sample shape too, all are real numbers and the floating ones finite, and
the set must not be *degenerate* (:func:`degenerate_reason`) unless
``allow_degenerate=True``. Integer inputs — the rule: a bare integer tensor given for a model
without ``nn.Embedding`` / ``nn.EmbeddingBag`` (``keep_integers=False``; in
:func:`mipp.prune`, :func:`mipp.inputs.reads_token_ids` decides) is taken for unscaled images
(e.g. uint8 in 0..255) and converted to float32, with an :class:`UnscaledInputWarning` (once
per call) when its values exceed 1, since models are trained on scaled inputs. Token ids
(the model has an embedding) and integer entries of a dict or tuple (masks, ids) stay
integers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mipp import distributed
from mipp.errors import CalibrationError
from mipp.inputs import Batch, Samples, describe
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


def _is_inputs(value: Any) -> bool:
    """An array, a dict or a non-empty tuple / list (as a ``DataLoader`` collates a tuple):
    something read as inputs (checked by :func:`_inputs`)."""
    return (
        _is_array(value)
        or isinstance(value, Mapping)
        or (isinstance(value, tuple | list) and bool(value))
    )


def _inputs(value: Any, what: str) -> Batch:
    """Inputs of an array, a dict of arrays (keyword) or a tuple / list of arrays
    (positional), numpy converted; anything else is refused by type."""
    if isinstance(value, Mapping):
        if not value:
            raise CalibrationError(f"{what} is an empty dict; give its tensors by name")
        for key in value:
            if not isinstance(key, str):
                raise CalibrationError(
                    f"{what} is a dict with the key {key!r}; keyword inputs need str keys"
                )
        return {k: _array(v, f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(value, tuple | list) and value:
        return tuple(_array(v, f"{what}[{i}]") for i, v in enumerate(value))
    return _array(value, what)


def _leaves(x: Batch) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x.values() if isinstance(x, Mapping) else x)


def _layout(x: Batch, *, batched: bool = True) -> tuple:
    """What must agree between batches (``batched``: sample shapes) or between per-sample
    inputs (whole shapes): the keys or positions, and each shape."""
    start = 1 if batched else 0
    if isinstance(x, Tensor):
        return (tuple(x.shape[start:]),)
    names = list(x) if isinstance(x, Mapping) else list(range(len(x)))
    return tuple((k, tuple(t.shape[start:])) for k, t in zip(names, _leaves(x), strict=True))


def _count(x: Batch, what: str) -> int:
    """The number of samples of ``x``: the leading dimension every array shares."""
    leaves = _leaves(x)
    if any(t.ndim == 0 for t in leaves):
        if isinstance(x, Tensor):
            raise CalibrationError(f"{what} are a single number; give (n, ...)")
        raise CalibrationError(f"{what} hold a single number; every input needs a batch dimension")
    sizes = [int(t.shape[0]) for t in leaves]
    if len(set(sizes)) > 1:
        raise CalibrationError(
            f"{what} hold different numbers of samples ({', '.join(map(str, sizes))}); every "
            f"input shares the batch dimension"
        )
    return sizes[0]


def _join(parts: list[Batch], op) -> Batch:
    """``op`` (``torch.cat`` / ``torch.stack``) entry by entry over inputs of one layout."""
    first = parts[0]
    if isinstance(first, Tensor):
        return op(parts)
    if isinstance(first, Mapping):
        return {k: op([p[k] for p in parts]) for k in first}
    return tuple(op([p[i] for p in parts]) for i in range(len(first)))


def _take(x: Batch, index: Tensor | slice) -> Batch:
    return x[index] if isinstance(x, Tensor) else Samples(x)[index].value


def _scalar_label(value: Any) -> bool:
    """A per-sample label: a Python / numpy number or a 0-dim tensor / array."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return _is_array(value) and value.ndim == 0


def _from_iterable(data: Iterable[Any], n: int) -> tuple[Batch | None, Tensor | None]:
    parts: list[Batch] = []
    labels: list[Tensor] = []
    samples: list[Batch] = []
    sample_labels: list[Any] = []
    count = 0
    for k, item in enumerate(data):
        if isinstance(item, tuple | list) and len(item) >= 2 and _scalar_label(item[1]):
            if parts:
                raise CalibrationError(
                    f"item {k} of the calibration data is a per-sample (input, label) pair but "
                    f"earlier items are batches; give one kind"
                )
            samples.append(_inputs(item[0], f"the input of calibration item {k}"))
            sample_labels.append(item[1])
            count += 1
        elif (
            _is_array(item)
            or isinstance(item, Mapping)
            or (isinstance(item, tuple | list) and item and _is_inputs(item[0]))
        ):
            if samples:
                raise CalibrationError(
                    f"item {k} of the calibration data is a batch but earlier items are "
                    f"per-sample (input, label) pairs; give one kind"
                )
            bare = _is_array(item) or isinstance(item, Mapping)
            x = _inputs(item if bare else item[0], f"calibration batch {k}")
            if any(t.ndim == 0 for t in _leaves(x)):
                raise CalibrationError(
                    f"calibration batch {k} is a single number; batches are (b, ...) arrays"
                )
            b = _count(x, f"the inputs of calibration batch {k}")
            if parts and _layout(x) != _layout(parts[0]):
                if isinstance(x, Tensor) and isinstance(parts[0], Tensor):
                    raise CalibrationError(
                        f"calibration batch {k} holds inputs of shape {tuple(x.shape[1:])}, "
                        f"batch 0 of shape {tuple(parts[0].shape[1:])}; all must match"
                    )
                raise CalibrationError(
                    f"calibration batch {k} holds {describe(x)}, batch 0 "
                    f"{describe(parts[0])}; all must match"
                )
            parts.append(x)
            if not bare and len(item) > 1 and _is_array(item[1]):
                y = _array(item[1], f"the labels of calibration batch {k}")
                if y.ndim == 0 or len(y) != b:
                    raise CalibrationError(
                        f"calibration batch {k} has {b} inputs but labels of shape "
                        f"{tuple(y.shape)}; give one label per input"
                    )
                labels.append(y)
            count += b
        else:
            what = (
                f"a {type(item).__name__} of {len(item)} item(s) starting with a {_type(item[0])}"
                if isinstance(item, tuple | list) and item
                else _type(item)
            )
            raise CalibrationError(
                f"calibration item {k} is {what}; each item must be a batch (a tensor or numpy "
                f"array, a dict of them, or a tuple (inputs, labels)) or a per-sample pair "
                f"(input, label)"
            )
        if count >= n:
            break
    if samples:
        layouts = {_layout(s, batched=False) for s in samples}
        if len(layouts) > 1:
            shown = [lay[0] if isinstance(samples[0], Tensor) else lay for lay in layouts]
            some = ", ".join(map(str, sorted(shown, key=str)[:3]))
            raise CalibrationError(
                f"the per-sample calibration inputs differ in shape ({some}); all must match"
            )
        x = _take(_join(samples, torch.stack), slice(None, n))
        try:
            y = torch.as_tensor(
                np.asarray([v.item() if _is_array(v) else v for v in sample_labels])
            )[:n]
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"the per-sample labels are not numbers: {e}") from None
        return x, y
    if not parts:
        return None, None
    x = _take(_join(parts, torch.cat), slice(None, n))
    y = torch.cat(labels)[:n] if labels and len(labels) == len(parts) else None
    return x, y


def degenerate_reason(x: Batch) -> str | None:
    """Why ``x`` is a degenerate calibration set, or None if it is not.

    ``x``: inputs ``(n, ...)``, or a dict / tuple of them (a sample is then all its entries).
    The rule: with ``n >= 2`` samples, the set is degenerate when it holds a single distinct
    input (all zeros, one image repeated) or fewer distinct inputs than half the samples.
    On such a set every unit's activations are (nearly) constant, every estimated
    information is 0 and a pruning method removes units at random, or almost all of them.

    >>> degenerate_reason(torch.zeros(8, 3))
    'only 1 distinct input among 8 samples'
    >>> degenerate_reason(torch.randn(8, 3)) is None
    True
    """
    leaves = _leaves(x)
    n = len(leaves[0])
    if n < 2:
        return None
    # distinct rows by a fixed random projection (O(n·d), no copy of x; two different rows
    # collide only if they differ below float64 resolution along it), not a row sort
    gen = torch.Generator().manual_seed(0)
    keys = torch.zeros(n, dtype=torch.float64)
    for t in leaves:
        flat = t.reshape(n, -1)
        w = torch.randn(flat.shape[1], generator=gen, dtype=torch.float64)
        keys += torch.cat(
            [chunk.to(torch.float64) @ w.to(chunk.device) for chunk in flat.split(256)]
        ).cpu()
    distinct = int(torch.unique(keys).numel())
    if distinct == 1 or 2 * distinct < n:
        return f"only {distinct} distinct input{'s' if distinct > 1 else ''} among {n} samples"
    return None


def calibration_inputs(
    data: Any,
    n: int,
    *,
    seed: int,
    allow_degenerate: bool = False,
    keep_integers: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Batch, Tensor | None]:
    """The calibration inputs and their labels ``(n,)`` (None if unknown).

    ``data``: one of the forms in the module docstring. An ImageDataset, inputs or a pair
    ``(inputs, labels)`` give a seeded subset of ``n`` (all of it when it holds fewer); an
    iterable gives its first ``n`` samples. The inputs come back in their form: a tensor
    ``(n, *input_shape)``, or a dict / tuple of tensors ``(n, ...)`` (numpy arrays become
    tensors). ``keep_integers``: a bare integer tensor is token ids, kept as it is (the model
    reads it with an embedding); otherwise it is converted to float32 (module docstring).

    ``shard=(r, N)``: this process is rank r of N (:mod:`mipp.distributed`). In-memory data
    is the same on every rank: the subset of ``n`` is drawn as above and rank r keeps its
    rows r, r + N, …; an iterable is the rank's own shard, of which it reads its
    :func:`~mipp.distributed.share` of ``n``.

    Raises:
        CalibrationError: ``data`` is of no accepted form (the message names its type), is
            empty, holds non-finite or non-numeric inputs, or is degenerate
            (:func:`degenerate_reason`) and ``allow_degenerate`` is False.

    Warns:
        UnscaledInputWarning: integer inputs converted to float32 with values above 1.
    """
    y: Tensor | None = None
    x: Batch | None
    streamed = False
    if isinstance(data, ImageDataset):
        ds = calibration_subset(data, min(n, len(data)), seed=seed) if len(data) else data
        x, y = ds.x, ds.y
    elif (
        _is_array(data)
        or isinstance(data, Mapping)
        or (
            isinstance(data, tuple)
            and len(data) == 2
            and _is_inputs(data[0])
            and (_is_array(data[1]) or data[1] is None)
        )
    ):
        if not isinstance(data, tuple):
            x = _inputs(data, "the calibration inputs")
        else:
            x = _inputs(data[0], "the calibration inputs")
            y = None if data[1] is None else _array(data[1], "the calibration labels")
            if y is not None and (
                any(t.ndim == 0 for t in _leaves(x))
                or y.ndim == 0
                or _count(x, "the calibration inputs") != len(y)
            ):
                shape = tuple(x.shape) if isinstance(x, Tensor) else describe(x)
                raise CalibrationError(
                    f"the pair (inputs, labels) has inputs of shape {shape} and labels "
                    f"of shape {tuple(y.shape)}; give one label per input"
                )
        size = _count(x, "the calibration inputs")
        if size > n:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(size, generator=gen)[:n].sort().values
            x = _take(x, pick)
            y = None if y is None else y[pick]
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes):
        x, y = _from_iterable(data, distributed.share(n, *shard))  # the rank's own shard
        streamed = True
    else:
        raise CalibrationError(
            f"data must be an ImageDataset, a tensor or numpy array of inputs (or a dict of "
            f"them), a pair (inputs, labels), an iterable of batches or of (input, label) "
            f"pairs, got {_type(data)}"
        )
    rank, world = shard
    if world > 1 and not streamed and x is not None:
        # in memory, the same set on every rank: this rank's rows rank, rank + world, ...
        pick = torch.arange(rank, _count(x, "the calibration inputs"), world)
        x = _take(x, pick)
        y = None if y is None else y[pick]
    if x is None or len(_leaves(x)[0]) == 0:
        where = f" on rank {rank} of {world}" if world > 1 else ""
        raise CalibrationError(f"the calibration set is empty{where}")
    return _checked(x, allow_degenerate=allow_degenerate, keep_integers=keep_integers), y


def _checked(x: Batch, *, allow_degenerate: bool, keep_integers: bool = False) -> Batch:
    if isinstance(x, Tensor):
        x = _checked_tensor(x, keep_integers=keep_integers)
    else:
        shaped = [t for t in _leaves(x) if t.ndim >= 2]
        if not shaped:
            raise CalibrationError(
                f"calibration inputs need a batch dimension and, on one of them, a sample "
                f"shape, e.g. (n, d); got {describe(x)}"
            )
        for t in _leaves(x):
            if t.numel() == 0 or t.is_complex():
                problem = "hold no values" if t.numel() == 0 else f"are {t.dtype}, not real"
                raise CalibrationError(f"the calibration {describe(x)} {problem}")
    bad = sum(int((~torch.isfinite(t)).sum()) for t in _leaves(x) if t.is_floating_point())
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


def _checked_tensor(x: Tensor, *, keep_integers: bool) -> Tensor:
    if x.ndim < 2:
        raise CalibrationError(
            f"calibration inputs need a batch dimension and a sample shape, e.g. (n, d) or "
            f"(n, c, h, w); got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise CalibrationError(f"calibration inputs of shape {tuple(x.shape)} hold no values")
    if x.dtype == torch.bool or x.is_complex():
        raise CalibrationError(f"calibration inputs must be real numbers, got {x.dtype}")
    if not x.is_floating_point() and not keep_integers:
        if int(x.max()) > 1:
            warnings.warn(
                f"calibration inputs are {str(x.dtype).removeprefix('torch.')} with values up "
                f"to {int(x.max())}: they are used unscaled; scale them as the model was "
                f"trained (e.g. x / 255, then normalise)",
                UnscaledInputWarning,
                stacklevel=5,
            )
        x = x.float()
    return x


#: calibration samples :func:`constant_groups` runs through the model
CONSTANT_CHECK_SAMPLES = 64


def constant_groups(model: Any, x: Tensor | Samples, groups: Iterable[Any]) -> list[str]:
    """Names of the unit groups whose every unit is constant over the calibration samples.

    One forward of at most :data:`CONSTANT_CHECK_SAMPLES` samples of ``x`` reads every
    consumer's input (unpooled; per feature only its largest deviation from the first sample
    and its largest magnitude are kept, :func:`~mipp.surgery.capture.input_spreads`). A unit
    is constant when each consumer's input columns it feeds differ across the samples by at
    most 4 rounding units of their dtype relative to their largest magnitude (exactly 0 for
    all-zero columns): the same arithmetic on equal values, not a small signal (a layer with
    tiny weights still varies). A group all of whose units are constant carries no
    information about anything on this data: MIPP would find every unit redundant and a
    data-based baseline would rank them at random.
    """
    from mipp.surgery.capture import input_spreads  # capture holds the forward hooks

    groups = list(groups)
    modules = dict(model.named_modules())
    layers = {c.layer: modules[c.layer] for g in groups for c in g.consumers}
    if len(x) < 2 or not layers:
        return []
    seen, error = input_spreads(model, x[:CONSTANT_CHECK_SAMPLES], layers)
    if error is not None:
        raise error
    out = []
    for g in groups:
        constant = True
        for c in g.consumers:
            if c.layer not in seen:
                constant = False
                break
            spreads, sizes, eps = seen[c.layer]
            for idx in c.index:
                cols = list(idx)
                # NaN compares False: non-finite columns are not "constant" (the statistics
                # pass then names the layer they come from)
                if not float(spreads[cols].max()) <= 4 * eps * float(sizes[cols].max()):
                    constant = False
                    break
            if not constant:
                break
        if constant:
            out.append(g.name)
    return out
