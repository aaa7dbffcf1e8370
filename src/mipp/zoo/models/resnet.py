"""ResNet-18/34/50 (He et al. 2016): adapted to 32×32 inputs, as in most CIFAR pruning work,
and with the ImageNet stem for inputs of 128 px and more."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mipp.errors import InvalidOptionError
from mipp.zoo.models._common import check_common, init_weights
from mipp.zoo.models.blocks import BasicBlock, Bottleneck

__all__ = ["ResNet", "load_torchvision_resnet", "resnet18", "resnet34", "resnet50"]

ResNetDepth = Literal[18, 34, 50]

_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}

#: Smallest supported ``input_size``.
RESNET_MIN_INPUT_SIZE = 8
#: Inputs at least this wide get the ImageNet stem (7×7 stride-2 conv + 3×3 stride-2 max-pool).
IMAGENET_STEM_MIN_SIZE = 128


class ResNet(nn.Module):
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks, expansion 4).

    Stem for inputs under :data:`IMAGENET_STEM_MIN_SIZE` (128) px: ``conv1`` (3×3, 64,
    stride 1) → ``bn1`` → ``relu1``, no max-pool (the CIFAR adaptation). From 128 px on, the
    ImageNet stem of the paper and torchvision: ``conv1`` (7×7, 64, stride 2, padding 3) →
    ``bn1`` → ``relu1`` → ``maxpool`` (3×3, stride 2, padding 1); the parameter tensors then
    have torchvision's shapes and order (a projection shortcut is ``shortcut.conv`` /
    ``shortcut.bn`` where torchvision says ``downsample.0`` / ``downsample.1``), so its weights
    load after renaming (:func:`mipp.zoo.models.load_torchvision_resnet`). Then
    ``layer1`` … ``layer4`` (64/128/256/512 planes; stride 2 at the start of layers 2–4),
    ``avgpool`` (global) → ``flatten`` → ``fc``. Shortcuts are 1×1 conv + BN projections
    where the shape changes, identities elsewhere. Parameters at 10 classes and 32 px:
    ResNet-18 11,173,962; ResNet-34 21,282,122; ResNet-50 23,520,842 (the 7×7 stem adds
    7,680; ResNet-50 at 1,000 classes and 224 px has torchvision's 25,557,032).

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
        self.depth = depth
        block, counts = _SPECS[depth]
        if input_size >= IMAGENET_STEM_MIN_SIZE:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
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
        x = self.maxpool(self.relu1(self.bn1(self.conv1(x))))
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


def _torchvision_name(key: str) -> str:
    return key.replace(".downsample.0.", ".shortcut.conv.").replace(
        ".downsample.1.", ".shortcut.bn."
    )


def load_torchvision_resnet(
    source: str | Path | Mapping[str, Tensor], *, input_size: int = 224
) -> ResNet:
    """A :class:`ResNet` holding torchvision ``resnet18`` / ``resnet34`` / ``resnet50`` weights.

    ``source`` is a state dict or a file holding one: ``.safetensors`` (read with
    safetensors) or a ``torch.save`` file (``.pth`` / ``.pt``, read with
    ``weights_only=True``), e.g. torchvision's released ImageNet weights saved where the data
    lives (nothing is downloaded here). The depth, classes and input channels come from the
    tensors; ``input_size`` (default 224, at least 128) gives the ImageNet stem. Keys are
    renamed (``downsample.0`` / ``.1`` → ``shortcut.conv`` / ``.bn``) and loaded strictly, so
    a state dict of another architecture is refused with the names that do not fit
    (:class:`~mipp.errors.InvalidOptionError`, as is a missing file:
    :class:`FileNotFoundError`).
    """
    if input_size < IMAGENET_STEM_MIN_SIZE:
        raise InvalidOptionError(
            f"input_size must be >= {IMAGENET_STEM_MIN_SIZE} for torchvision's ImageNet stem, "
            f"got {input_size}"
        )
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weights file")
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, Mapping):
            raise InvalidOptionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {_torchvision_name(k): v for k, v in state.items()}
    try:
        counts = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
            for i in (1, 2, 3, 4)
        )
        bottleneck = "layer1.0.conv3.weight" in state
        depth = next(
            d for d, (b, c) in _SPECS.items() if c == counts and (b is Bottleneck) == bottleneck
        )
        num_classes, _ = state["fc.weight"].shape
        in_channels = state["conv1.weight"].shape[1]
    except (StopIteration, KeyError, IndexError, ValueError) as exc:
        raise InvalidOptionError(
            f"not a torchvision ResNet-18/34/50 state dict (blocks per stage "
            f"{counts if 'counts' in locals() else '?'}; missing or odd key: {exc})"
        ) from None
    model = ResNet(
        depth=depth, num_classes=num_classes, in_channels=in_channels, input_size=input_size
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidOptionError(
            f"torchvision ResNet-{depth} weights do not fit: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model
