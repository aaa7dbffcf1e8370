"""VGG-11/13/16/19 with BatchNorm, CIFAR style (Simonyan & Zisserman 2015, configs A/B/D/E)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from mipp.zoo.models._common import check_common, check_widths, init_weights

__all__ = ["VGG", "VGG_STAGES", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_default_widths"]

VGGDepth = Literal[11, 13, 16, 19]

#: Conv layers per stage (a max-pool closes each of the 5 stages), configs A, B, D, E.
VGG_STAGES: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_STAGE_WIDTHS = (64, 128, 256, 512, 512)

#: Smallest supported ``input_size``.
VGG_MIN_INPUT_SIZE = 8


def vgg_default_widths(depth: VGGDepth) -> tuple[int, ...]:
    """The standard conv widths of VGG-``depth``, one per conv layer, e.g. 13 for VGG-16."""
    if depth not in VGG_STAGES:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_STAGES)}, got {depth!r}")
    return tuple(w for n, w in zip(VGG_STAGES[depth], _STAGE_WIDTHS, strict=True) for _ in range(n))


class VGG(nn.Module):
    """VGG with BatchNorm for small images.

    ``features``: for every conv layer ``i`` (1-based), ``conv{i}`` (3×3, pad 1, no bias) →
    ``bn{i}`` → ``relu{i}``; stage ``j`` ends with ``pool{j}`` (2×2 max-pool, stride 2).
    Then ``avgpool`` (global average) → ``flatten`` → ``fc`` (``widths[-1] → num_classes``).

    Every max-pool uses ``ceil_mode=True``. At 32 px (even sides throughout) this is the
    ordinary pool, 32 → 16 → 8 → 4 → 2 → 1; at 28 px it gives 28 → 14 → 7 → 4 → 2 → 1
    instead of reaching 0 at the fifth pool, so the architecture (and its pruning
    structure) is the same for every input size and no pixel is discarded.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: Output units.
        in_channels: Input channels.
        input_size: Side of the square input, >= 8.
        widths: Conv widths, one per conv layer (8, 10, 13 or 16 entries); the max-pool
            positions are fixed by ``depth``. ``None`` gives the standard 64 … 512.

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> VGG(depth=11, widths=(8,) * 8)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        depth: VGGDepth = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        name = f"vgg{depth}"
        default = vgg_default_widths(depth)
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=VGG_MIN_INPUT_SIZE,
            model=name,
        )
        widths = default if widths is None else tuple(widths)
        check_widths(widths, expected_len=len(default), model=name)

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        previous, i = in_channels, 0
        for stage, n_convs in enumerate(VGG_STAGES[depth], start=1):
            for _ in range(n_convs):
                i += 1
                width = widths[i - 1]
                layers[f"conv{i}"] = nn.Conv2d(previous, width, 3, padding=1, bias=False)
                layers[f"bn{i}"] = nn.BatchNorm2d(width)
                layers[f"relu{i}"] = nn.ReLU()
                previous = width
            layers[f"pool{stage}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        return self.fc(self.flatten(self.avgpool(self.features(x))))


def vgg11(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """VGG-11 with BatchNorm (config A, 8 conv layers); see :class:`VGG`."""
    return VGG(
        depth=11,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        widths=widths,
    )


def vgg13(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """VGG-13 with BatchNorm (config B, 10 conv layers); see :class:`VGG`."""
    return VGG(
        depth=13,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        widths=widths,
    )


def vgg16(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """VGG-16 with BatchNorm (config D, 13 conv layers; 14,724,042 parameters at 10 classes:
    bias-free convs, so 4,224 fewer than the often-quoted 14.73 M); see :class:`VGG`.
    """
    return VGG(
        depth=16,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        widths=widths,
    )


def vgg19(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> VGG:
    """VGG-19 with BatchNorm (config E, 16 conv layers); see :class:`VGG`."""
    return VGG(
        depth=19,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        widths=widths,
    )
