"""Shared test helpers: small models with non-trivial BatchNorm and masked references."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mipp.methods.base import PruneContext
from mipp.surgery.costs import CostModel
from mipp.surgery.structure import build_structure
from mipp.surgery.verify import zero_consumer_inputs
from mipp.zoo import models
from mipp.zoo.training import seeded


class TinyResNet(nn.Module):
    """A user's own residual network: stem, two residual blocks (one projecting), concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.a1 = nn.Conv2d(8, 6, 3, padding=1)
        self.a1_bn = nn.BatchNorm2d(6)
        self.a_act = nn.ReLU()
        self.a2 = nn.Conv2d(6, 8, 3, padding=1)
        self.a2_bn = nn.BatchNorm2d(8)
        self.a_out = nn.ReLU()
        self.b1 = nn.Conv2d(8, 5, 3, stride=2, padding=1)
        self.b_act = nn.ReLU()
        self.b2 = nn.Conv2d(5, 12, 3, padding=1)
        self.proj = nn.Conv2d(8, 12, 1, stride=2)
        self.b_out = nn.ReLU()
        self.left = nn.Conv2d(12, 4, 1)
        self.right = nn.Conv2d(12, 3, 1)
        self.cat_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(7, 10)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        x = self.a_out(self.a2_bn(self.a2(self.a_act(self.a1_bn(self.a1(x))))) + x)
        x = self.b_out(self.b2(self.b_act(self.b1(x))) + self.proj(x))
        x = self.cat_act(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc2(self.fc_act(self.fc1(self.flat(self.pool(x)))))


def make_model(name: str, *, n: int = 4, input_size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode with randomised BatchNorm statistics, and ``n`` inputs."""
    with seeded(0):
        if name == "tiny-resnet":
            model = TinyResNet()
            x = torch.randn(n, 3, 8, 8)
        elif name == "vgg11-narrow":
            widths = (8, 16, 24, 24, 32, 32, 32, 32)
            model = models.create("vgg11", input_size=input_size, widths=widths)
            x = torch.randn(n, 3, input_size, input_size)
        elif name in ("lenet5", "mlp"):
            model = models.create(name, in_channels=1, input_size=28)
            x = torch.randn(n, 1, 28, 28)
        else:
            model = models.create(name, in_channels=3, input_size=input_size)
            x = torch.randn(n, 3, input_size, input_size)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    return model.eval(), x


def zero_consumers(model: nn.Module, structure, removed: dict[str, list[int]]) -> None:
    """Zero, in place, every consumer weight reading a removed unit (the masked reference)."""
    zero_consumer_inputs(model, structure, removed)


def make_ctx(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, batch_size: int = 4
) -> PruneContext:
    """A method's context on a working copy of ``model``, as :func:`mipp.prune` builds it."""
    work = copy.deepcopy(model).eval()
    structure = build_structure(work, x[:2])
    return PruneContext(
        model=work,
        structure=structure,
        groups=structure.in_scope("internal"),
        costs=CostModel(structure, x[:2]),
        inputs=x,
        labels=y,
        batch_size=batch_size,
        seed=0,
    )
