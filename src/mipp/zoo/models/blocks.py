"""Residual blocks shared by the CIFAR ResNets and ResNet-18/34/50 (He et al. 2016).

Every block names its children the same way so pruning code can find them: ``conv1``,
``bn1``, ``relu1``, ``conv2``, ``bn2`` (``relu2``, ``conv3``, ``bn3`` in the bottleneck),
``shortcut`` (an ``nn.Sequential`` holding ``conv`` (1×1) and ``bn`` when the shape changes,
empty for the identity) and ``relu_out`` applied to ``out + identity``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "projection_shortcut"]


def projection_shortcut(in_planes: int, out_planes: int, *, stride: int) -> nn.Sequential:
    """1×1 conv + BN projection (option B) when the shape changes, else an empty Sequential."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
            bn=nn.BatchNorm2d(out_planes),
        )
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection; ``expansion = 1``.

    Shapes: ``(n, in_planes, h, w)`` → ``(n, planes, ⌈h/stride⌉, ⌈w/stride⌉)``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = projection_shortcut(in_planes, planes, stride=stride)
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward; see the class docstring for shapes."""
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (carries the stride) → 1×1 expand (×4), with a residual connection.

    Shapes: ``(n, in_planes, h, w)`` → ``(n, 4·planes, ⌈h/stride⌉, ⌈w/stride⌉)``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = projection_shortcut(in_planes, out_planes, stride=stride)
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Residual block forward; see the class docstring for shapes."""
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + identity)
