"""The calibration set every pruning method shares: inputs and, when known, labels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mipp.zoo.data import ImageDataset, calibration_subset

__all__ = ["calibration_inputs"]


def calibration_inputs(data: Any, n: int, *, seed: int) -> tuple[Tensor, Tensor | None]:
    """The calibration inputs ``(n, *input_shape)`` and their labels (None if unknown).

    ``data``: an :class:`~mipp.zoo.data.ImageDataset` or a pair ``(inputs, labels)`` (a seeded
    subset of ``n`` is drawn), a tensor of inputs (same), or an iterable of batches — input
    tensors or ``(inputs, labels)`` pairs (the first ``n`` samples are taken).
    """
    y: Tensor | None = None
    if isinstance(data, ImageDataset):
        ds = calibration_subset(data, min(n, len(data)), seed=seed) if len(data) else data
        x, y = ds.x, ds.y
    elif isinstance(data, Tensor) or (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and len(data[0]) == len(data[1])
    ):
        x, y = (data, None) if isinstance(data, Tensor) else data
        if len(x) > n:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(x), generator=gen)[:n].sort().values
            x = x[pick]
            y = None if y is None else y[pick]
    elif isinstance(data, Iterable):
        parts, labels, count = [], [], 0
        for batch in data:
            if isinstance(batch, list | tuple):
                parts.append(batch[0])
                if len(batch) > 1 and isinstance(batch[1], Tensor):
                    labels.append(batch[1])
            else:
                parts.append(batch)
            count += len(parts[-1])
            if count >= n:
                break
        x = torch.cat(parts)[:n] if parts else torch.empty(0)
        if labels and len(labels) == len(parts):
            y = torch.cat(labels)[:n]
    else:
        raise TypeError(
            f"data must be an ImageDataset, a tensor of inputs, a pair (inputs, labels) or an "
            f"iterable of batches, got {type(data).__name__}"
        )
    if len(x) == 0:
        raise ValueError("the calibration set is empty")
    return x, y
