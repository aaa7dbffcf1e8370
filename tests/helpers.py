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
from mipp.zoo.models.googlenet import googlenet
from mipp.zoo.models.mobilenet import mobilenetv2
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


class DepthwiseNet(nn.Module):
    """Depthwise-separable blocks: an inverted residual (expand, depthwise, project, add) and
    a plain one reading the stem through a depthwise conv with a channel multiplier of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.dw0 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw0_bn = nn.BatchNorm2d(8)
        self.pw0 = nn.Conv2d(8, 8, 1)
        self.pw0_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.expand_bn = nn.BatchNorm2d(16)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=True)
        self.dw1_bn = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1)
        self.project_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.dw0_bn(self.dw0(x)))
        x = self.pw0_bn(self.pw0(x))
        h = torch.relu(self.expand_bn(self.expand(x)))
        h = torch.relu(self.dw1_bn(self.dw1(h)))
        x = x + self.project_bn(self.project(h))
        return self.fc(self.flat(self.pool(torch.relu(self.head(x)))))


class GroupedNet(nn.Module):
    """Grouped convolutions: a ResNeXt-style block (1x1, 3x3 with groups=4, 1x1) and a
    grouped 1x1 (groups=2) reading a grouped 3x3 (groups=4): units tie 4 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.reduce_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.grouped_bn = nn.BatchNorm2d(16)
        self.pair = nn.Conv2d(16, 12, 1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        h = torch.relu(self.reduce_bn(self.reduce(x)))
        h = torch.relu(self.grouped_bn(self.grouped(h)))
        return self.fc(self.flat(self.pool(torch.relu(self.pair(h)))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (n, C, H, W) map (ConvNeXt's, as timm writes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NormNet(nn.Module):
    """Normalisations that span channels: GroupNorm (4 groups of 4: units tie 4 channels),
    a GroupNorm with one channel per group, a ConvNeXt-style block (depthwise 7×7,
    channels-first LayerNorm, 1×1 expand and project, residual add) and a LayerNorm before
    the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.inorm = nn.GroupNorm(12, 12)
        self.dw = nn.Conv2d(12, 12, 7, padding=3, groups=12)
        self.ln2d = LayerNorm2d(12)
        self.pw1 = nn.Conv2d(12, 24, 1)
        self.pw2 = nn.Conv2d(24, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.stem(x)))
        x = torch.relu(self.inorm(self.conv(x)))
        x = x + self.pw2(torch.nn.functional.gelu(self.pw1(self.ln2d(self.dw(x)))))
        return self.fc(self.ln(self.flat(self.pool(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: q, k, v and output projections. The head
    count is fixed in the reshapes (heads cannot be pruned) unless ``declare_heads``: then
    the module says its ``head_dim`` and sizes its reshapes from the projections."""

    def __init__(self, width: int, heads: int, *, declare_heads: bool = False) -> None:
        super().__init__()
        self.heads = heads
        if declare_heads:
            self.head_dim = width // heads
            self.num_heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        size = getattr(self, "head_dim", d // self.heads)
        shape = (n, t, -1, size) if hasattr(self, "head_dim") else (n, t, self.heads, size)
        q, k, v = (f(x).view(*shape).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / size**0.5, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(n, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)) with a GELU hidden layer;
    the attention is written out or ``nn.MultiheadAttention``."""

    def __init__(
        self, width: int = 16, heads: int = 4, *, torch_mha: bool = False, declare: bool = False
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.torch_mha = torch_mha
        if torch_mha:
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        else:
            self.attn = SelfAttention(width, heads, declare_heads=declare)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.torch_mha else self.attn(h))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Tokens (n, 6, 8) → a linear embedding → two blocks → LayerNorm → mean → classifier."""

    def __init__(self, *, torch_mha: bool = False, declare: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(
            *(TransformerBlock(torch_mha=torch_mha, declare=declare) for _ in range(2))
        )
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(x))).mean(1))


def make_model(name: str, *, n: int = 4, input_size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode with randomised BatchNorm statistics, and ``n`` inputs."""
    with seeded(0):
        if name == "tiny-resnet":
            model = TinyResNet()
            x = torch.randn(n, 3, 8, 8)
        elif name == "depthwise-net":
            model = DepthwiseNet()
            x = torch.randn(n, 3, 8, 8)
        elif name == "grouped-net":
            model = GroupedNet()
            x = torch.randn(n, 3, 8, 8)
        elif name in ("transformer", "transformer-mha", "transformer-heads"):
            model = TinyTransformer(
                torch_mha=name == "transformer-mha", declare=name == "transformer-heads"
            )
            x = torch.randn(n, 6, 8)
        elif name == "norm-net":
            model = NormNet()
            x = torch.randn(n, 3, 8, 8)
            for m in model.modules():  # non-trivial affine parameters
                if isinstance(m, nn.GroupNorm | nn.LayerNorm):
                    m.weight.data.uniform_(0.5, 1.5)
                    m.bias.data.normal_(0, 0.2)
        elif name == "mobilenetv2-narrow":
            model = mobilenetv2(input_size=input_size, width_mult=0.25)
            x = torch.randn(n, 3, input_size, input_size)
        elif name == "googlenet-narrow":
            model = googlenet(input_size=input_size, width_mult=0.125)
            x = torch.randn(n, 3, input_size, input_size)
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
