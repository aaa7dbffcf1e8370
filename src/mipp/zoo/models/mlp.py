"""Fully connected network: Flatten → [Linear → ReLU]* → Linear (LeNet-300-100 by default)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from mipp.zoo.models._common import check_common, check_widths, init_weights

__all__ = ["MLP", "mlp"]


class MLP(nn.Sequential):
    """Multi-layer perceptron with one ``nn.ReLU`` module per hidden layer.

    Children, in order: ``flatten``, then ``fc1, relu1, ..., fcK, reluK`` for the ``K``
    hidden widths, then the output layer ``fc{K+1}``. The default widths ``(300, 100)`` on
    28×28×1 inputs give LeNet-300-100 (LeCun et al. 1998; 266,610 parameters).

    Args:
        in_features: Inputs per sample after flattening. ``None`` (default) computes it as
            ``in_channels * input_size**2``; when given it takes precedence.
        in_channels: Channels of an image input (used only when ``in_features`` is None).
        input_size: Spatial side of a square image input (same).
        widths: Hidden-layer widths, each >= 1, at least one.
        num_classes: Output units.

    Shapes: input ``(n, *)`` with ``in_features`` elements per sample (e.g. ``(n, c, h, w)``)
    → logits ``(n, num_classes)``.

    >>> import torch
    >>> MLP(in_channels=1, input_size=28)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_features: int | None = None,
        in_channels: int = 3,
        input_size: int = 32,
        widths: Sequence[int] = (300, 100),
        num_classes: int = 10,
    ) -> None:
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=1,
            model="MLP",
        )
        if in_features is None:
            in_features = in_channels * input_size * input_size
        elif isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"MLP: in_features must be an integer >= 1, got {in_features!r}")
        widths = tuple(widths)
        check_widths(widths, expected_len=None, model="MLP")

        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        previous = in_features
        for i, width in enumerate(widths, start=1):
            layers[f"fc{i}"] = nn.Linear(previous, width)
            layers[f"relu{i}"] = nn.ReLU()
            previous = width
        layers[f"fc{len(widths) + 1}"] = nn.Linear(previous, num_classes)
        super().__init__(layers)
        init_weights(self)


def mlp(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> MLP:
    """:class:`MLP` on ``in_channels × input_size²`` inputs (widths default 300, 100)."""
    return MLP(
        in_channels=in_channels,
        input_size=input_size,
        widths=(300, 100) if widths is None else widths,
        num_classes=num_classes,
    )
