"""MobileNetV2 for small images (Sandler et al. 2018), the common 32-pixel adaptation.

Inverted residual blocks: a 1×1 *expand* conv (``t`` × the input width; absent when t = 1),
a 3×3 *depthwise* conv (``groups`` = channels) and a linear 1×1 *project* conv, each with its
own BatchNorm and ReLU6 (none after the projection), and an identity shortcut when the
stride is 1 and the width is kept. For 32-px inputs the stem and the second stage keep the
resolution (stride 1 instead of 2), as in the usual CIFAR versions, so the last map is 4×4.
"""

from __future__ import annotations

from torch import Tensor, nn

from mipp.zoo.models._common import check_common, check_width_mult, init_weights

__all__ = ["MOBILENETV2_SETTINGS", "InvertedResidual", "MobileNetV2", "mobilenetv2"]

#: (expansion t, output channels c, blocks n, stride of the first block s) per stage
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet network
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

#: Smallest supported ``input_size`` (three stride-2 stages).
MOBILENETV2_MIN_INPUT_SIZE = 8


class InvertedResidual(nn.Module):
    """expand (1×1) → depthwise (3×3) → project (1×1), shortcut when shapes allow."""

    def __init__(self, in_planes: int, out_planes: int, *, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_shortcut = stride == 1 and in_planes == out_planes
        if expansion != 1:
            self.expand = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
            self.expand_relu = nn.ReLU6()
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.dw_relu = nn.ReLU6()
        self.project = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if hasattr(self, "expand"):
            h = self.expand_relu(self.expand_bn(self.expand(h)))
        h = self.dw_relu(self.dw_bn(self.dw(h)))
        h = self.project_bn(self.project(h))
        return x + h if self.use_shortcut else h


class MobileNetV2(nn.Module):
    """MobileNetV2 (width multiplier 1 by default) for ``input_size``-pixel images.

    ``conv1`` (3×3, 32) → ``bn1`` → ``relu1`` → ``features`` (17 inverted residual blocks,
    :data:`MOBILENETV2_SETTINGS`) → ``conv2`` (1×1, 1280) → ``bn2`` → ``relu2`` → ``avgpool``
    → ``flatten`` → ``fc``. ``width_mult`` scales every width (rounded to a multiple of 8, at
    least 8) except the classifier's input of 1280 at multipliers up to 1.

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> MobileNetV2(width_mult=0.25)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=MOBILENETV2_MIN_INPUT_SIZE,
            model="mobilenetv2",
        )
        check_width_mult(width_mult, model="mobilenetv2")

        def width(c: int) -> int:
            return max(8, int(c * width_mult + 4) // 8 * 8)

        planes = width(32)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU6()
        blocks: list[nn.Module] = []
        for t, c, n, s in MOBILENETV2_SETTINGS:
            out = width(c)
            for i in range(n):
                blocks.append(InvertedResidual(planes, out, stride=s if i == 0 else 1, expansion=t))
                planes = out
        self.features = nn.Sequential(*blocks)
        last = max(1280, width(1280))
        self.conv2 = nn.Conv2d(planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(self.features(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def mobilenetv2(
    *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width_mult: float = 1.0
) -> MobileNetV2:
    """MobileNetV2 for small images (see :class:`MobileNetV2`)."""
    return MobileNetV2(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        width_mult=width_mult,
    )
