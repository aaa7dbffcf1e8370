"""Small ConvNeXt and Vision Transformer for 32-pixel images, in plain PyTorch.

They carry the structures of today's architectures into the zoo so the default tests
exercise them without extra packages: depthwise convolutions, LayerNorm (channels-first
and over tokens), Linear layers on channels-last maps and on tokens, layer-scale gammas,
a ``cls_token`` and a learned ``pos_embed``, and multi-head self-attention whose module
declares its ``head_dim`` (so its heads are prunable units).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mipp.zoo.models._common import check_common

__all__ = ["ConvNeXt", "LayerNorm2d", "SelfAttention", "ViT", "convnext", "vit"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(n, C, H, W)`` map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """depthwise 7×7 → LayerNorm → Linear (4×) → GELU → Linear → layer scale, plus the input
    (Liu et al. 2022, Fig. 4), on a channels-last map between the two Linear layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.gamma * self.fc2(self.act(self.fc1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt for small images: a 2×2 stride-2 stem, four stages of
    :class:`ConvNeXtBlock` (``depths``, ``widths``) with LayerNorm + 2×2 stride-2
    downsampling between them, global average pooling, LayerNorm and a Linear classifier.

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> ConvNeXt()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        depths: tuple[int, ...] = (2, 2, 4, 2),
        widths: tuple[int, ...] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=16,
            model="convnext",
        )
        self.stem = nn.Conv2d(in_channels, widths[0], 2, stride=2)
        self.stem_norm = LayerNorm2d(widths[0])
        stages: list[nn.Module] = []
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], width, 2, stride=2)]
            layers += [ConvNeXtBlock(width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        x = self.stages(self.stem_norm(self.stem(x)))
        return self.fc(self.norm(self.flatten(self.pool(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections; it declares ``head_dim``
    and ``num_heads`` and sizes its reshapes from the projections, so heads can be removed."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = (
            f(x).view(n, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        a = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, -1))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A Vision Transformer for small images (Dosovitskiy et al. 2021): ``patch``×``patch``
    patches embedded by a strided conv, a ``cls_token`` and a learned ``pos_embed``,
    ``depth`` pre-norm blocks, LayerNorm and a Linear head on the class token.

    Shapes: ``(n, in_channels, input_size, input_size)`` → ``(n, num_classes)``.

    >>> ViT()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        patch: int = 4,
        width: int = 96,
        depth: int = 4,
        heads: int = 3,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        check_common(
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            min_input_size=patch,
            model="vit",
        )
        tokens = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` → logits ``(n, num_classes)``."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


def convnext(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ConvNeXt:
    """A ConvNeXt for 32-px images (see :class:`ConvNeXt`)."""
    return ConvNeXt(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def vit(*, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ViT:
    """A ViT for 32-px images: 4×4 patches, width 96, 4 blocks of 3 heads (see :class:`ViT`)."""
    return ViT(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
