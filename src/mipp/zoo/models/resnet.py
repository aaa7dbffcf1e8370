"""ResNet-18/34/50 (He et al. 2016) adapted to 32×32 inputs, as in most CIFAR pruning work."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from mipp.zoo.models._common import check_common, init_weights
from mipp.zoo.models.blocks import BasicBlock, Bottleneck

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50"]

ResNetDepth = Literal[18, 34, 50]

_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}

#: Smallest supported ``input_size``.
RESNET_MIN_INPUT_SIZE = 8


class ResNet(nn.Module):
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks, expansion 4) for small images.

    Stem: ``conv1`` (3×3, 64, stride 1) → ``bn1`` → ``relu1``, no max-pool. Then
    ``layer1`` … ``layer4`` (64/128/256/512 planes; stride 2 at the start of layers 2–4),
    ``avgpool`` (global) → ``flatten`` → ``fc``. Shortcuts are 1×1 conv + BN projections
    where the shape changes, identities elsewhere. Parameters at 10 classes: ResNet-18
    11,173,962; ResNet-34 21,282,122; ResNet-50 23,520,842.

    Args:
        depth: 18, 34 or 50.
        num_classes: Output units.
        in_channels: Input channels.
        input_size: Side of the square input, >= 8 (global pooling accepts any size).

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> ResNet(depth=18)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        depth: ResNetDepth = 18,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if depth not in _SPECS:
            raise ValueError(f"ResNet: depth must be one of {sorted(_SPECS)}, got {depth!r}")
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=RESNET_MIN_INPUT_SIZE,
            model=f"resnet{depth}",
        )
        block, counts = _SPECS[depth]
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU()
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2), strict=True):
            layers: list[nn.Module] = []
            for i in range(blocks):
                layers.append(block(in_planes, planes, stride=stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet18(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-18 for 32×32 inputs; see :class:`ResNet`."""
    return ResNet(depth=18, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def resnet34(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-34 for 32×32 inputs; see :class:`ResNet`."""
    return ResNet(depth=34, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def resnet50(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """ResNet-50 for 32×32 inputs; see :class:`ResNet`."""
    return ResNet(depth=50, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
