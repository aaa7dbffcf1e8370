"""What a model runs on: one tensor, a tuple of positional tensors or a dict of keyword
tensors, and how a batch of them runs through the model.

An image classifier takes one tensor, ``model(x)``; a Hugging Face text model takes keyword
arguments, ``model(input_ids=..., attention_mask=...)``, and returns a ``ModelOutput`` whose
``.logits`` are its output. Every stage of :func:`mipp.prune` that runs the model on
calibration data (the input probe, the structure trace, capture, verification, the repairs,
the cost and latency tables, the baselines) holds the data as :class:`Samples`, which

- counts, slices and indexes n samples (every tensor shares the leading dimension n);
- moves them to a model (:meth:`Samples.to`): floating tensors to its device and floating
  dtype, integer and bool tensors (token ids, masks) to its device only;
- runs a batch (:meth:`Samples.run`) with ``forward(model, batch) -> Tensor``, by default
  :func:`default_forward`: ``model(x)`` for a tensor, ``model(*x)`` for a tuple,
  ``model(**x)`` for a dict, and of what it returns the tensor :func:`output_tensor` picks.

Its ``value`` is a tensor whenever the data is one, so the tensor path is the plain
``model(x)`` it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mipp.errors import MippError

__all__ = [
    "Batch",
    "Forward",
    "ModelOutputError",
    "Samples",
    "as_samples",
    "call_model",
    "default_forward",
    "describe",
    "output_tensor",
    "reads_token_ids",
]

#: one batch of model inputs: a tensor, a tuple of tensors (positional arguments) or a dict
#: of tensors (keyword arguments), each ``(b, ...)``
Batch = Tensor | tuple[Tensor, ...] | dict[str, Tensor]
#: ``forward(model, batch) -> Tensor``: how to run a batch and which output mipp preserves
Forward = Callable[[nn.Module, Any], Tensor]


class ModelOutputError(MippError, ValueError):
    """The model (or ``forward=``) gave no output tensor mipp can use; the message names
    what it gave and suggests ``forward=``."""


def _kind(value: Any) -> str:
    kind = type(value)
    package = kind.__module__.split(".")[0]
    return kind.__qualname__ if package == "builtins" else f"{package}.{kind.__qualname__}"


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def output_tensor(out: Any) -> Tensor:
    """The tensor of a model's output that mipp preserves: the output itself when it is a
    tensor, else its ``logits`` (a Hugging Face ``ModelOutput``, or any object or dict with a
    ``logits`` tensor), else the first element of a tuple or list starting with a tensor.

    Raises:
        ModelOutputError: none of these; the message names the output's type.

    >>> output_tensor((torch.ones(2), "extra")).shape
    torch.Size([2])
    """
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ModelOutputError(
        f"the model returned a {_kind(out)}, not a tensor, an output with .logits or a tuple "
        f"starting with a tensor; pass forward=lambda model, batch: ... returning the output "
        f"tensor to preserve"
    )


def default_forward(model: nn.Module, batch: Any) -> Tensor:
    """``output_tensor(call_model(model, batch))``: the ``forward`` used when none is given."""
    return output_tensor(call_model(model, batch))


def reads_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.Embedding`` / ``nn.EmbeddingBag``: then integer inputs
    are token ids and stay integers (:func:`mipp.surgery.calibration.calibration_inputs`)."""
    return any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in model.modules())


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, tuple):
        items = list(value)
    else:
        raise MippError(
            f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
            f"{_kind(value)}"
        )
    bad = [_kind(v) for v in items if not isinstance(v, Tensor)]
    if bad or not items:
        raise MippError(
            f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, got a "
            f"{type(value).__name__} " + (f"holding a {bad[0]}" if bad else "of nothing")
        )
    return items


def _map(value: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: fn(v) for k, v in value.items()}
    return tuple(fn(v) for v in value)


class Samples:
    """``n`` samples of a model's input and the ``forward`` that runs a batch of them.

    ``value``: a tensor ``(n, ...)``, a tuple of tensors (positional arguments) or a dict of
    tensors (keyword arguments), every tensor with the leading dimension n. ``forward``:
    ``forward(model, batch) -> Tensor`` (None: :func:`default_forward`).

    >>> s = Samples({"ids": torch.zeros(6, 4, dtype=torch.long), "w": torch.ones(6, 4)})
    >>> len(s), len(s[2:5]), s.to("cpu", torch.float64).describe()
    (6, 3, 'keyword inputs ids (4,) int64, w (4,) float64')
    """

    def __init__(self, value: Batch, *, forward: Forward | None = None) -> None:
        leaves = _leaves(value)
        if any(t.ndim == 0 for t in leaves):
            raise MippError(f"model inputs need a batch dimension, got {describe(value)}")
        sizes = {int(t.shape[0]) for t in leaves}
        if len(sizes) > 1:
            raise MippError(
                f"the model inputs hold different numbers of samples ({describe(value)}); "
                f"every tensor must share the batch dimension"
            )
        self.value = value
        self.forward = forward
        self.tensors = leaves

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: of the first tensor that has one (``(n, ...)`` with ndim >= 2),
        else of the first tensor (``()``)."""
        shaped = [t for t in self.tensors if t.ndim >= 2] or self.tensors
        return tuple(shaped[0].shape[1:])

    def with_value(self, value: Batch) -> Samples:
        """Other inputs run by the same ``forward``."""
        return Samples(value, forward=self.forward)

    def __getitem__(self, index: slice | Tensor) -> Samples:
        """The samples at ``index`` (a slice or an index tensor) of every tensor."""
        return self.with_value(_map(self.value, lambda t: t[index]))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Samples:
        """Every tensor on ``device``; floating ones also in ``dtype`` (a floating dtype, or
        None to keep theirs). Integer and bool tensors keep their dtype."""
        cast = dtype is not None and dtype.is_floating_point

        def move(t: Tensor) -> Tensor:
            return (
                t.to(device=device, dtype=dtype) if cast and t.is_floating_point() else t.to(device)
            )

        return self.with_value(_map(self.value, move))

    def batches(self, size: int) -> Iterator[Samples]:
        """Consecutive batches of ``size`` samples (the last one may be smaller)."""
        for i in range(0, len(self), size):
            yield self[i : i + size]

    def run(self, model: nn.Module) -> Tensor:
        """``forward(model, value)``: the output tensor mipp preserves.

        Raises:
            ModelOutputError: the output is no tensor (see :func:`output_tensor`).
        """
        if self.forward is None:
            return default_forward(model, self.value)
        out = self.forward(model, self.value)
        if not isinstance(out, Tensor):
            raise ModelOutputError(
                f"forward= returned a {_kind(out)}; it must return the output tensor to preserve"
            )
        return out

    def describe(self) -> str:
        """What one sample holds, for messages (:func:`describe`)."""
        return describe(self.value)

    def __repr__(self) -> str:
        return f"Samples({len(self)} × {self.describe()})"


def describe(value: Batch) -> str:
    """What one sample of ``value`` holds, for messages: ``inputs of shape (1, 28, 28)`` for a
    tensor; each tensor's sample shape and dtype for a tuple or dict.

    >>> describe((torch.zeros(5, 16, dtype=torch.long), torch.ones(5, 16)))
    'positional inputs (16,) int64, (16,) float32'
    """

    def one(t: Tensor) -> str:
        return f"{tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(value, Tensor):
        return f"inputs of shape {tuple(value.shape[1:])}"
    if isinstance(value, Mapping):
        return "keyword inputs " + ", ".join(f"{k} {one(t)}" for k, t in value.items())
    return "positional inputs " + ", ".join(one(t) for t in value)


def as_samples(x: Batch | Samples) -> Samples:
    """``x`` itself, or inputs (a tensor ``(n, ...)``, a tuple or dict of them) as
    :class:`Samples` run by :func:`default_forward` (``model(x)`` for a tensor)."""
    return x if isinstance(x, Samples) else Samples(x)
