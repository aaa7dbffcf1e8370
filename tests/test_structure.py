"""Unit groups and physical removal: pruned(x) == original with the same units zeroed."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from helpers import make_model as _model
from helpers import zero_consumers as _zero_consumers
from mipp.metrics import count_macs, count_params
from mipp.surgery.costs import CostModel
from mipp.surgery.structure import UnsupportedModuleError, build_structure

ZOO = ["mlp", "lenet5", "vgg11", "vgg16", "resnet20", "resnet56", "resnet18", "resnet50"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in ZOO]
    + ["tiny-resnet"],
)
def test_pruned_equals_masked_original(name):
    model, x = _model(name)
    pruned = copy.deepcopy(model)
    structure = build_structure(pruned, x[:2])
    gen = torch.Generator().manual_seed(1)
    removed = {}
    for g in structure.groups:  # scope "all": residual streams too
        k = max(1, g.size // 2)
        removed[g.name] = torch.randperm(g.size, generator=gen)[:k].tolist()
    predicted = CostModel(structure, x[:1])(
        {
            n: torch.isin(torch.arange(structure.group(n).size), torch.tensor(v))
            for n, v in removed.items()
        }
    )
    masked = copy.deepcopy(model)
    _zero_consumers(masked, build_structure(masked, x[:2]), removed)
    structure.remove(removed)
    with torch.no_grad():  # in float64, so the test checks exactness, not round-off
        diff = (pruned.double()(x.double()) - masked.double()(x.double())).abs().max().item()
    assert diff < 1e-9
    assert predicted == (count_params(pruned), count_macs(pruned, x[:1].double()).macs)
    assert count_params(pruned) < count_params(model)
    for g in structure.groups:  # every group lost exactly what was asked
        widths = {g.size - len(removed[g.name])}
        modules = dict(pruned.named_modules())
        for p in g.producers:
            m = modules[p]
            widths.add(m.out_channels if hasattr(m, "out_channels") else m.out_features)
        assert len(widths) == 1


def test_group_kinds_and_order_on_resnet20():
    model, x = _model("resnet20")
    structure = build_structure(model, x[:2])
    kinds = [g.kind for g in structure.groups]
    assert kinds.count("internal") == 9 and kinds.count("stream") == 3
    positions = [g.position for g in structure.groups]
    assert positions == sorted(positions, reverse=True)  # output -> input
    assert structure.output_layer == "fc"
    assert len(structure.in_scope("internal")) == 9
    assert len(structure.in_scope("all")) == 12
    # a block's conv1 is read by its conv2 only, whose output is the block output
    g = structure.group("layer1.0.conv1")
    assert [c.layer for c in g.consumers] == ["layer1.0.conv2"]
    assert structure.next_layers["layer1.0.conv2"] == ["layer1.1.conv1"]


def test_flatten_consumer_maps_each_channel_to_its_map():
    model, x = _model("lenet5")
    structure = build_structure(model, x[:2])
    (fc1,) = structure.group("conv2").consumers
    assert fc1.layer == "fc1"
    assert [list(ix) for ix in fc1.index[:2]] == [list(range(25)), list(range(25, 50))]


def test_concat_consumer_reads_two_groups():
    model, x = _model("tiny-resnet")
    structure = build_structure(model, x[:2])
    owners = sorted(name for name, _ in structure.readers["fc1"])
    assert owners == ["left", "right"]
    index = {name: [list(ix) for ix in c.index] for name, c in structure.readers["fc1"]}
    assert index == {"left": [[0], [1], [2], [3]], "right": [[4], [5], [6]]}


def test_concat_then_flatten_of_maps_is_refused_not_mis_pruned():
    """Torch-Pruning 1.6.1 couples both concat branches when a flatten of 2x2 maps follows."""
    model, x = _model("tiny-resnet")
    model.pool = nn.AdaptiveAvgPool2d(2)
    model.fc1 = nn.Linear(28, 10)
    with pytest.raises(UnsupportedModuleError, match="cannot map the output channels of 'right'"):
        build_structure(model, x[:2])


@pytest.mark.parametrize(
    ("module", "needle"),
    [
        (nn.LayerNorm(8), "'norm' (LayerNorm)"),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), "'norm' (Conv2d, groups=8)"),
    ],
)
def test_unsupported_module_is_named(module, needle):
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("norm", module)
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8 * 8 * 8, 2))
    with pytest.raises(UnsupportedModuleError, match=re.escape(needle)):
        build_structure(model, torch.randn(2, 3, 8, 8))


def test_removing_every_unit_is_refused():
    model, x = _model("lenet5")
    structure = build_structure(model, x[:2])
    with pytest.raises(ValueError, match="refusing to remove all 6 units"):
        structure.remove({"conv1": list(range(6))})
