"""Plain-PyTorch model families and the model registry.

Every model uses one ``nn.ReLU`` module per use (so activations can be hooked per layer),
gives each Conv/Linear its own BatchNorm/ReLU modules, and writes residual additions as
``relu_out(out + identity)``, so Torch-Pruning's ``DependencyGraph`` can trace it.

Names are resolved here, at the edge: ``create("resnet20", num_classes=100)``.

>>> import torch
>>> model = create("lenet5", in_channels=1, input_size=28)
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from mipp.errors import InvalidOptionError, build_checked
from mipp.registry import lookup
from mipp.zoo.models.blocks import BasicBlock, Bottleneck
from mipp.zoo.models.googlenet import GoogLeNet, googlenet
from mipp.zoo.models.lenet import LeNet5, lenet5
from mipp.zoo.models.mlp import MLP, mlp
from mipp.zoo.models.mobilenet import MobileNetV2, mobilenetv2
from mipp.zoo.models.resnet import (
    ResNet,
    load_torchvision_resnet,
    resnet18,
    resnet34,
    resnet50,
)
from mipp.zoo.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from mipp.zoo.models.transformers import ConvNeXt, ViT, convnext, vit
from mipp.zoo.models.vgg import VGG, vgg11, vgg13, vgg16, vgg19

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ConvNeXt",
    "GoogLeNet",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "ViT",
    "create",
    "describe",
    "list_models",
    "load_torchvision_resnet",
    "output_layer",
]

#: Model name → factory taking keyword-only ``num_classes``, ``in_channels``, ``input_size``
#: (and ``widths`` for the families that accept it).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "googlenet": googlenet,
    "convnext": convnext,
    "vit": vit,
}

_DESCRIPTIONS: dict[str, str] = {
    "mlp": "MLP Flatten→[Linear→ReLU]*→Linear, widths 300-100 (LeNet-300-100 on 28 px)",
    "lenet5": "LeNet-5: conv 6-16 (5×5) + fc 120-84; 61,706 params at 1 ch/32 px/10 classes",
    "vgg11": "VGG-11 with BatchNorm, CIFAR style (8 conv + 1 fc); 9.23 M params",
    "vgg13": "VGG-13 with BatchNorm, CIFAR style (10 conv + 1 fc); 9.41 M params",
    "vgg16": "VGG-16 with BatchNorm, CIFAR style (13 conv + 1 fc); 14.72 M params",
    "vgg19": "VGG-19 with BatchNorm, CIFAR style (16 conv + 1 fc); 20.04 M params",
    "resnet20": "CIFAR ResNet-20 (3×3 basic blocks, 16/32/64 ch, projection shortcuts); 0.27 M",
    "resnet32": "CIFAR ResNet-32 (3×3 basic blocks, 16/32/64 ch, projection shortcuts); 0.47 M",
    "resnet56": "CIFAR ResNet-56 (3×3 basic blocks, 16/32/64 ch, projection shortcuts); 0.86 M",
    "resnet18": "ResNet-18, basic blocks: 3×3 stem < 128 px, ImageNet stem ≥ 128 px; 11.17 M",
    "resnet34": "ResNet-34, basic blocks: 3×3 stem < 128 px, ImageNet stem ≥ 128 px; 21.28 M",
    "resnet50": "ResNet-50, bottlenecks: 3×3 stem < 128 px, ImageNet stem ≥ 128 px; 23.52 M",
    "mobilenetv2": "MobileNetV2 for 32 px (inverted residuals, depthwise 3×3); 2.24 M params",
    "convnext": "ConvNeXt for 32 px (depthwise 7×7, LayerNorm, 4× MLP), widths 32-256; 1.92 M",
    "googlenet": "GoogLeNet for 32 px (9 four-branch Inception modules, concatenations); 5.87 M",
    "vit": "ViT for 32 px: 4×4 patches, width 96, 4 blocks × 3 heads, cls token; 0.45 M",
}


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def describe(name: str) -> str:
    """One-line description of a registered model (parameter counts at 3 ch, 10 classes)."""
    lookup(MODELS, name, kind="model")
    return _DESCRIPTIONS[name]


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """Build the registered model ``name`` with freshly initialised weights.

    Args:
        name: A key of :data:`MODELS`; an unknown name raises
            :class:`~mipp.errors.UnknownNameError` listing the valid ones.
        num_classes: Output units, >= 1.
        in_channels: Input channels, >= 1.
        input_size: Side of the square input (28 and 32 are supported by every model;
            minimum 1 for ``mlp``, 12 for ``lenet5``, 8 for the VGGs and ResNets).
        widths: Layer widths for ``mlp`` (hidden widths), ``lenet5`` (conv1, conv2, fc1,
            fc2) and ``vgg*`` (one per conv layer). Passing it to a ResNet raises
            :class:`~mipp.errors.InvalidOptionError` (a ``ValueError``), as does any value
            the model refuses.

    Returns:
        A module mapping ``(n, in_channels, input_size, input_size)`` to
        ``(n, num_classes)`` logits, in training mode. Uses the global RNG for
        initialisation; seed it (``torch.manual_seed``) for reproducible weights.
    """
    factory = lookup(MODELS, name, kind="model")
    options: dict[str, object] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
    }
    if widths is not None:
        if "widths" not in inspect.signature(factory).parameters:
            accepting = ", ".join(
                n for n, f in MODELS.items() if "widths" in inspect.signature(f).parameters
            )
            raise InvalidOptionError(
                f"model {name!r} does not accept widths (got {tuple(widths)!r}); "
                f"models that do: {accepting}"
            )
        options["widths"] = widths
    return build_checked(factory, **options)  # the model's own value checks: one line


def output_layer(model: nn.Module) -> nn.Linear:
    """The classifier of a model built here: its last ``nn.Linear`` in registration order.

    This is the layer to pass in Torch-Pruning's ``ignored_layers``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]
