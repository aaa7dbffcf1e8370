"""Checks of what a user hands mipp, made before any work, each failing with one
:class:`~mipp.errors.MippError` line that names the bad value and what is valid.

- :func:`expected_input_shape`: the input a zoo model built from a
  :class:`~mipp.types.ModelSpec` takes (checkpoints record it);
- :func:`check_input_shape`: data against an expected input shape, both in the message;
- :func:`check_model_input`: one forward pass of two samples through a bare module, its
  shape error re-raised naming the data's shape (and the expected one, where known);
- :func:`check_labels`: labels for the loss-based methods — integer class indices in range;
- :func:`check_match`: a report given to ``match=`` was made on this model (same input shape,
  same unit groups);
- :func:`check_device`: a torch device name that this build and machine have.

Calibration data forms and degenerate calibration sets are checked where the data is read,
in :func:`mipp.surgery.calibration.calibration_inputs`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mipp.errors import MippError
from mipp.inputs import Samples, as_samples
from mipp.report import PruneReport
from mipp.types import ModelSpec

__all__ = [
    "DeviceError",
    "InputShapeError",
    "LabelError",
    "MatchError",
    "available_devices",
    "check_device",
    "check_input_shape",
    "check_labels",
    "check_match",
    "check_match_model",
    "check_model_input",
    "expected_input_shape",
]


class InputShapeError(MippError, ValueError):
    """The data's samples do not have the shape the model takes."""


class LabelError(MippError, ValueError):
    """Labels that a loss cannot use: not integers, not one per sample, or out of range."""


class MatchError(MippError, ValueError):
    """A report given to ``match=`` was made on another model."""


class DeviceError(MippError, ValueError):
    """A device name torch does not know, or one this machine does not have."""


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def expected_input_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """``(in_channels, input_size, input_size)``: one input of the zoo model ``spec`` builds.

    >>> expected_input_shape(ModelSpec("lenet5", in_channels=1, input_size=28))
    (1, 28, 28)
    """
    return (spec.in_channels, spec.input_size, spec.input_size)


def check_input_shape(
    actual: Sequence[int],
    expected: Sequence[int],
    *,
    what: str = "the data",
    model: str = "",
    flatten: bool = False,
) -> None:
    """Raise :class:`InputShapeError` unless one sample of ``what`` (shape ``actual``, no
    batch dimension) has the ``expected`` shape — with ``flatten`` (a model that flattens its
    input first, e.g. the zoo's ``mlp``), the same number of values.

    >>> check_input_shape((1, 8, 8), (1, 28, 28), what="digits")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mipp.validation.InputShapeError: digits has inputs of shape (1, 8, 8) but the model takes ...
    """
    if flatten and math.prod(actual) == math.prod(expected):
        return
    if tuple(actual) != tuple(expected):
        layout = " (channels, height, width)" if len(expected) == 3 else ""
        if flatten:
            layout = f" (or any shape of {math.prod(expected)} values)"
        raise InputShapeError(
            f"{what} has inputs of shape {_shape(actual)} but {model or 'the model'} takes "
            f"{_shape(expected)}{layout}"
        )


def check_model_input(
    model: nn.Module, x: Tensor | Samples, *, expected: Sequence[int] | None = None
) -> int | None:
    """Run two samples of ``x`` (a tensor or :class:`~mipp.inputs.Samples`) through
    ``model`` (no gradients, eval mode for the pass) before any real work; returns the size
    of the output's last dimension (the classes of a classifier; the output is what
    ``Samples.run`` returns), or None for a 0-dim output.

    With ``expected`` (a checkpoint's recorded input shape) the shapes are compared first.
    A forward pass that fails on the data's shape ("mat1 and mat2 shapes cannot be
    multiplied", "expected input to have 1 channels") or arguments ("got an unexpected
    keyword argument") is re-raised as one :class:`InputShapeError` line naming the data's
    sample shape and torch's complaint; an output with no tensor to use, as one
    :class:`~mipp.inputs.ModelOutputError` line.
    """
    name = type(model).__name__
    x = as_samples(x)
    if expected is not None:
        check_input_shape(x.sample_shape, expected, what="the calibration data", model=name)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = x[:2].run(model)
    except (RuntimeError, TypeError) as e:
        first = " ".join(str(e).strip().splitlines()[0].split()) if str(e).strip() else ""
        if isinstance(x.value, Tensor):
            raise InputShapeError(
                f"{name} cannot take the data's inputs of shape {_shape(x.sample_shape)} "
                f"(batch {_shape(x.value[:2].shape)}): {first}; give inputs of the shape the "
                f"model was built for (a list of per-sample tensors is read as batches: "
                f"torch.stack it)"
            ) from None
        raise InputShapeError(
            f"{name} cannot take the data's {x.describe()}: {first}; give the inputs its "
            f"forward takes, or pass forward=lambda model, batch: ..."
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    return int(out.shape[-1]) if out.ndim >= 1 else None


def check_labels(y: Tensor | None, num_classes: int | None, *, n: int, method: str = "") -> None:
    """Labels a classification loss can use: ``n`` integer class indices in
    ``[0, num_classes)`` (range unchecked when ``num_classes`` is None). None passes (the
    method's own ``require_labels`` says that labels are needed).

    >>> check_labels(torch.tensor([0.5, 1.0]), 10, n=2, method="snip")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mipp.validation.LabelError: method 'snip' needs integer class labels in [0, 10), got float32 ...
    """
    if y is None:
        return
    who = f"method {method!r}" if method else "the loss"
    valid = f"integer class labels in [0, {num_classes})" if num_classes else "integer labels"
    if y.ndim != 1 or len(y) != n:
        raise LabelError(
            f"{who} needs {n} {valid} (one per input), got labels of shape {_shape(y.shape)}"
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        example = y.flatten()[0].item() if y.numel() else None
        raise LabelError(
            f"{who} needs {valid}, got {str(y.dtype).removeprefix('torch.')} labels "
            f"(e.g. {example})"
        )
    if num_classes is not None and n:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = y[(y < 0) | (y >= num_classes)]
            raise LabelError(
                f"{who} needs {valid} (the model has {num_classes} outputs), got "
                f"{len(bad)} label(s) outside it (min {low}, max {high})"
            )


def check_match(report: PruneReport, *, input_shape: Sequence[int], groups: Iterable[str]) -> None:
    """Refuse a report to match that was made on another model: a different input shape,
    or different unit groups (the names :func:`~mipp.surgery.structure.build_structure`
    gives this model's groups in the run's scope)."""
    if not isinstance(report, PruneReport):
        raise MatchError(f"match must be a PruneReport, got {type(report).__name__}")
    theirs = tuple(report.input_shape)
    if theirs != tuple(input_shape):
        raise MatchError(
            f"the report to match was made on inputs of shape {_shape(theirs)}, this model "
            f"takes {_shape(input_shape)}: it is another model's report"
        )
    mine = list(groups)
    names = [g.name for g in report.groups]
    if set(names) != set(mine):
        only_theirs = [g for g in names if g not in mine][:3]
        only_mine = [g for g in mine if g not in names][:3]
        raise MatchError(
            f"the report to match has other unit groups than this model (only in the report: "
            f"{', '.join(only_theirs) or 'none'}; only in the model: "
            f"{', '.join(only_mine) or 'none'}): it is another model's report"
        )


def check_match_model(report: PruneReport, model: nn.Module, example: Tensor) -> None:
    """:func:`check_match` against ``model``'s own unit groups (in the report's scope), found
    on a copy of it with ``example`` inputs (their shape is the model's input shape)."""
    from mipp.surgery.structure import build_structure  # heavy; only when matching

    if not isinstance(report, PruneReport):
        raise MatchError(f"match must be a PruneReport, got {type(report).__name__}")
    check_match(
        report, input_shape=tuple(example.shape[1:]), groups=[g.name for g in report.groups]
    )
    scope = report.options.get("scope", "internal")
    from mipp.surgery.layers import as_linears

    work = copy.deepcopy(model).eval()
    as_linears(work)  # GPT-2's Conv1D, as mipp.prune sees it
    structure = build_structure(work, example[:2])
    groups = structure.in_scope(scope) if scope in ("internal", "all") else structure.groups
    check_match(report, input_shape=tuple(example.shape[1:]), groups=[g.name for g in groups])


def available_devices() -> list[str]:
    """The device names this build and machine can run on: ``cpu``, then ``cuda`` /
    ``cuda:0`` ... and ``mps`` where present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names += ["cuda", *(f"cuda:{i}" for i in range(count))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(name: str) -> torch.device:
    """The :class:`torch.device` called ``name``, if this machine has it; otherwise one
    :class:`DeviceError` line naming it and the available ones.

    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("foo")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mipp.validation.DeviceError: unknown device 'foo'; available: cpu...
    """
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; available: {', '.join(available)}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} is not available (this torch build or machine has no CUDA "
                f"GPU); available: {', '.join(available)}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} is not available (this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)); available: {', '.join(available)}"
            )
        return device
    if device.type == "mps" and "mps" in available:
        return device
    raise DeviceError(f"device {name!r} is not available; available: {', '.join(available)}")
