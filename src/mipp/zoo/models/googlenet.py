"""GoogLeNet (Szegedy et al. 2015, Inception v1) for small images, the common 32-pixel version.

Nine Inception modules, each four parallel branches whose outputs are concatenated along the
channels: a 1×1 conv; a 1×1 *reduce* conv then a 3×3; a 1×1 reduce then a 5×5; a 3×3 max-pool
(stride 1) then a 1×1 *pool projection*. Every conv has its own BatchNorm and ReLU. For 32-px
inputs the ImageNet stem (7×7 stride 2, pools, LRN) is one 3×3 conv to 192 channels, and two
stride-2 max-pools (after ``b3`` and ``e4``) leave an 8×8 map; no auxiliary classifiers. The
multi-branch graph is the point: a module's input feeds four convs (and a pool) at once, and
its output is a concatenation of four producers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mipp.zoo.models._common import check_common, check_width_mult, init_weights

__all__ = ["GOOGLENET_MODULES", "GoogLeNet", "Inception", "googlenet"]

#: per module: (name, 1×1, 3×3 reduce, 3×3, 5×5 reduce, 5×5, pool projection), the paper's
#: Table 1; a module's output width is 1×1 + 3×3 + 5×5 + pool projection
GOOGLENET_MODULES: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("a3", 64, 96, 128, 16, 32, 32),
    ("b3", 128, 128, 192, 32, 96, 64),
    ("a4", 192, 96, 208, 16, 48, 64),
    ("b4", 160, 112, 224, 24, 64, 64),
    ("c4", 128, 128, 256, 24, 64, 64),
    ("d4", 112, 144, 288, 32, 64, 64),
    ("e4", 256, 160, 320, 32, 128, 128),
    ("a5", 256, 160, 320, 32, 128, 128),
    ("b5", 384, 192, 384, 48, 128, 128),
)

#: Smallest supported ``input_size`` (two stride-2 pools).
GOOGLENET_MIN_INPUT_SIZE = 4


class _ConvBN(nn.Sequential):
    """conv (k×k, same padding, no bias) → BatchNorm → ReLU."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class Inception(nn.Module):
    """Four branches on one input, concatenated: ``b1`` (1×1), ``b2`` (1×1 → 3×3), ``b3``
    (1×1 → 5×5), ``b4`` (3×3 max-pool → 1×1)."""

    def __init__(
        self, cin: int, n1: int, r3: int, n3: int, r5: int, n5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.b1 = _ConvBN(cin, n1, 1)
        self.b2 = nn.Sequential(_ConvBN(cin, r3, 1), _ConvBN(r3, n3, 3))
        self.b3 = nn.Sequential(_ConvBN(cin, r5, 1), _ConvBN(r5, n5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _ConvBN(cin, pool_proj, 1))
        self.out_channels = n1 + n3 + n5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet for ``input_size``-pixel images; ``width_mult`` scales every conv width
    (rounded, at least 1).

    ``pre`` (3×3 conv to 192, BN, ReLU) → ``a3`` → ``b3`` → ``pool3`` → ``a4`` … ``e4`` →
    ``pool4`` → ``a5`` → ``b5`` → ``avgpool`` → ``flatten`` → ``fc``
    (:data:`GOOGLENET_MODULES`).

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> import torch
    >>> GoogLeNet(width_mult=0.125)(torch.zeros(2, 3, 32, 32)).shape
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
            min_input_size=GOOGLENET_MIN_INPUT_SIZE,
            model="googlenet",
        )
        check_width_mult(width_mult, model="googlenet")

        def width(c: int) -> int:
            return max(1, round(c * width_mult))

        planes = width(192)
        self.pre = _ConvBN(in_channels, planes, 3)
        for name, *widths in GOOGLENET_MODULES:
            module = Inception(planes, *(width(w) for w in widths))
            setattr(self, name, module)
            planes = module.out_channels
            if name in ("b3", "e4"):
                setattr(self, f"pool{name[1]}", nn.MaxPool2d(3, stride=2, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.pre(x)
        x = self.pool3(self.b3(self.a3(x)))
        x = self.pool4(self.e4(self.d4(self.c4(self.b4(self.a4(x))))))
        x = self.b5(self.a5(x))
        return self.fc(self.flatten(self.avgpool(x)))


def googlenet(
    *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width_mult: float = 1.0
) -> GoogLeNet:
    """GoogLeNet for small images (see :class:`GoogLeNet`)."""
    return GoogLeNet(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        width_mult=width_mult,
    )
