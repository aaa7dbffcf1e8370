"""MIPP's residual="branch" target: a block-internal unit is measured against its branch's
output, not the stream after the addition (which also holds the shortcut)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mipp
from mipp.methods import MIPP
from mipp.methods.targets import group_columns
from mipp.surgery.capture import OUTPUT, capture_activations
from mipp.surgery.structure import build_structure


class Block(nn.Module):
    """stem → s; s + conv2(conv1(s)) → head. conv1's units 2, 3 copy stream channels 0, 1
    and conv2 ignores them: they predict the shortcut, not the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1)
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Linear(4, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.stem.weight.copy_(torch.randn(4, 4, 1, 1, generator=g))
            w1 = torch.randn(4, 4, generator=g)
            w1[2], w1[3] = torch.eye(4)[0], torch.eye(4)[1]  # copies of s₀, s₁
            self.conv1.weight.copy_(w1[:, :, None, None])
            w2 = torch.randn(4, 4, generator=g)
            w2[:, 2:] = 0  # the branch ignores units 2, 3
            self.conv2.weight.copy_(w2[:, :, None, None])

    def forward(self, x):
        s = self.stem(x)
        out = s + self.conv2(self.conv1(s))
        return self.head(out.mean((2, 3)))


def _data(n=512):
    return torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(1))


def test_branch_target_is_the_last_branch_layers_own_output():
    net = Block().eval()
    x = _data(64)
    structure = build_structure(net, x[:2])
    groups = [g for g in structure.groups if g.producers == ["conv1"]]
    layers = structure.recorded_modules({"conv2", "head"})
    layers["conv2" + OUTPUT] = net.conv2
    acts = capture_activations(net, [x], layers)
    with torch.no_grad():
        s = net.stem(x)
        branch = net.conv2(net.conv1(s)).mean((2, 3))
        total = (s + net.conv2(net.conv1(s))).mean((2, 3))
    _, y_branch, owner, _ = next(group_columns(structure, groups, acts, "mean", residual="branch"))
    torch.testing.assert_close(y_branch, branch)
    assert (owner == -2).all()  # the stream is outside scope "internal"
    _, y_sum, _, _ = next(group_columns(structure, groups, acts, "mean", residual="sum"))
    torch.testing.assert_close(y_sum, total)


def test_branch_target_drops_the_units_that_only_copy_the_shortcut():
    net = Block().eval()
    x = _data()
    rep = mipp.prune(net, x, method=MIPP(residual="branch", reconstruct=False), sparsity=0.4)
    conv1 = next(g for g in rep.report.groups if g.name == "conv1")
    assert conv1.removed == [2, 3]
    assert rep.report.options["residual"] == "branch"
    # against the sum, the copies carry information (they predict the shortcut's s₀, s₁)
    rep = mipp.prune(net, x, method=MIPP(residual="sum", reconstruct=False), sparsity=0.4)
    conv1 = next(g for g in rep.report.groups if g.name == "conv1")
    assert min(conv1.deltas[2], conv1.deltas[3]) > 1e-3


def test_a_plain_network_is_unchanged_and_bad_values_are_named():
    from mipp.zoo.training import seeded

    with seeded(0):
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(2))
    a = mipp.prune(net, x, method=MIPP(residual="sum"), sparsity=0.5).report
    b = mipp.prune(net, x, method=MIPP(residual="branch"), sparsity=0.5).report
    assert [g.removed for g in a.groups] == [g.removed for g in b.groups]
    with pytest.raises(ValueError, match="residual must be one of sum, branch; got 'stream'"):
        MIPP(residual="stream")
