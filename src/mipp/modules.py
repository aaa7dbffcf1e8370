"""Small helpers on a module's state: per-module train/eval modes and its first parameter.

Modes are restored per module, never with ``model.train(flag)``, which would flatten a
mixture (say, a frozen BatchNorm kept in eval inside a model in train mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from mipp.errors import MippError

__all__ = ["eval_mode", "first_parameter", "restore_modes", "training_modes"]


def training_modes(model: nn.Module) -> dict[str, bool]:
    """``{module name: training flag}`` of every submodule (the root is ``""``)."""
    return {name: m.training for name, m in model.named_modules()}


def restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Set each submodule's training flag from ``modes`` (names missing there are left)."""
    for name, m in model.named_modules():
        if name in modes:
            m.training = modes[name]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside the block; each one's own flag restored on exit,
    even on error.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> _ = net[1].eval()                    # a frozen BatchNorm in a training model
    >>> with eval_mode(net):
    ...     net.training, net[0].training
    (False, False)
    >>> net.training, net[0].training, net[1].training
    (True, True, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def first_parameter(model: nn.Module) -> nn.Parameter:
    """The model's first parameter (its device and dtype are the model's), or a
    :class:`~mipp.errors.MippError` naming the model when it has none.

    >>> first_parameter(nn.ReLU())
    Traceback (most recent call last):
    ...
    mipp.errors.MippError: ReLU has no parameters: there is nothing to prune or train
    """
    param = next(iter(model.parameters()), None)
    if param is None:
        raise MippError(
            f"{type(model).__name__} has no parameters: there is nothing to prune or train"
        )
    return param
