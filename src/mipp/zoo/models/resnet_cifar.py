"""CIFAR ResNets with 6n+2 layers (He et al. 2016, §4.2): ResNet-20/32/56."""

from __future__ import annotations

from torch import Tensor, nn

from mipp.zoo.models._common import check_common, init_weights
from mipp.zoo.models.blocks import BasicBlock

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]

#: Smallest supported ``input_size``.
CIFAR_RESNET_MIN_INPUT_SIZE = 8


class CifarResNet(nn.Module):
    """ResNet for 32×32 images with three stages of ``n = (depth - 2) / 6`` basic blocks.

    ``conv1`` (3×3, 16) → ``bn1`` → ``relu1`` → ``layer1`` (16 ch) → ``layer2`` (32 ch,
    stride 2) → ``layer3`` (64 ch, stride 2) → ``avgpool`` (global) → ``flatten`` → ``fc``.
    Each ``layerK`` is an ``nn.Sequential`` of :class:`~mipp.zoo.models.blocks.BasicBlock`.
    Shortcuts are identities except where the shape changes (first block of stages 2 and 3),
    where they are 1×1 conv + BN projections (the paper's option B; option A's zero padding
    is parameter-free, so option B adds 2,752 parameters: ResNet-20 272,474 and ResNet-56
    855,770 at 10 classes, against the paper's ≈0.27 M and ≈0.85 M).

    Args:
        depth: ``6n + 2`` layers, e.g. 20, 32, 44, 56, 110.
        num_classes: Output units.
        in_channels: Input channels.
        input_size: Side of the square input, >= 8 (global pooling accepts any size).

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> CifarResNet(depth=20)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or depth % 6 != 2:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1, got {depth!r}")
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=CIFAR_RESNET_MIN_INPUT_SIZE,
            model=f"resnet{depth}",
        )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride=stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-20 (n = 3; 272,474 parameters at 10 classes); see :class:`CifarResNet`."""
    return CifarResNet(
        depth=20, num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )


def resnet32(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-32 (n = 5); see :class:`CifarResNet`."""
    return CifarResNet(
        depth=32, num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )


def resnet56(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> CifarResNet:
    """ResNet-56 (n = 9; 855,770 parameters at 10 classes); see :class:`CifarResNet`."""
    return CifarResNet(
        depth=56, num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )
