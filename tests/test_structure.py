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
from mipp.surgery.verify import renormalised

ZOO = ["mlp", "lenet5", "vgg11", "vgg16", "resnet20", "resnet56", "resnet18", "resnet50"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in ZOO]
    + ["tiny-resnet", "depthwise-net", "grouped-net", "norm-net"],
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
    with torch.no_grad(), renormalised(masked, structure, removed):
        # in float64, so the test checks exactness, not round-off
        diff = (pruned.double()(x.double()) - masked.double()(x.double())).abs().max().item()
    assert diff < 1e-9
    assert predicted == (count_params(pruned), count_macs(pruned, x[:1].double()).macs)
    assert count_params(pruned) < count_params(model)
    for g in structure.groups:  # every group lost exactly what was asked
        widths = {(g.size - len(removed[g.name])) * g.ties}
        modules = dict(pruned.named_modules())
        for p in [*g.producers, *g.channelwise]:
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
        (nn.Bilinear(8, 8, 8), "'norm' (Bilinear)"),
        (nn.ConvTranspose2d(8, 8, 3, padding=1), "'norm' (ConvTranspose2d)"),
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


def test_every_unsupported_module_is_named_at_once():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4, 8))
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.ln = nn.LayerNorm((8, 8))
            self.act = nn.Bilinear(8, 8, 8)
            self.up = nn.ConvTranspose2d(8, 8, 2)
            self.fc = nn.Linear(8, 2)

    with pytest.raises(UnsupportedModuleError) as info:
        build_structure(Net(), torch.randn(2, 3, 8, 8))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("4 modules mipp cannot prune around: ")
    for needle in ("'<root>' (Net, parameters token)", "'ln' (LayerNorm over 2 dimensions)"):
        assert needle in message
    assert "'up' (ConvTranspose2d)" in message and "'act' (Bilinear)" in message


def test_depthwise_conv_goes_with_its_channels():
    model, x = _model("depthwise-net")
    structure = build_structure(model, x[:2])
    g = structure.group("expand")
    assert (g.kind, g.producers, g.channelwise, g.ties) == ("internal", ["expand"], ["dw1"], 1)
    assert [c.layer for c in g.consumers] == ["project"]
    # the stem's channels pass through dw0 to pw0: one internal group, read by pw0 only
    assert structure.group("stem").channelwise == ["dw0"]
    assert [c.layer for c in structure.group("stem").consumers] == ["pw0"]
    # the walk goes through depthwise convs: what follows expand is the next dense layer
    assert structure.next_layers["expand"] == ["project"]
    assert structure.next_layers["stem"] == ["pw0"]


def test_grouped_conv_ties_one_channel_of_every_block():
    model, x = _model("grouped-net")
    structure = build_structure(model, x[:2])
    reduce = structure.group("reduce")  # read by a conv with groups=4: 8 channels, 2 units
    assert (reduce.size, reduce.ties) == (2, 4)
    assert reduce.producer_index["reduce"] == ((0, 2, 4, 6), (1, 3, 5, 7))
    # grouped (groups=4, 16 outputs) read by pair (groups=2): blocks of 4 and of 8 → 4 units
    grouped = structure.group("grouped")
    assert (grouped.size, grouped.ties) == (4, 4)
    assert grouped.producer_index["grouped"][0] == (0, 4, 8, 12)
    pair = structure.group("pair")  # groups=2 producer read by a Linear after 2x2 pooling
    assert (pair.size, pair.ties) == (6, 2)
    assert pair.producer_index["pair"][0] == (0, 6)
    assert len(pair.consumers[0].index[0]) == 2 * 4  # 2 channels × a 2×2 map each
    pruned = copy.deepcopy(model)
    st = build_structure(pruned, x[:2])
    st.remove({"grouped": [1, 2], "pair": [0]})
    assert (pruned.grouped.out_channels, pruned.grouped.groups) == (8, 4)
    assert (pruned.pair.in_channels, pruned.pair.out_channels, pruned.pair.groups) == (8, 10, 2)


def test_layer_norm_weights_follow_the_kept_channels():
    """Torch-Pruning 1.6.1 slices LayerNorm parameters in set order: keeping channels 3 and
    10 of 12 gave them as [10, 3]; the removal re-slices them in channel order."""
    model, x = _model("norm-net")
    removed = {"conv": [0, 1, 2, 4, 5, 6, 7, 8, 9, 11]}
    pruned = copy.deepcopy(model)
    build_structure(pruned, x[:2]).remove(removed)
    assert torch.equal(pruned.ln.weight, model.ln.weight[[3, 10]])
    assert torch.equal(pruned.ln2d.bias, model.ln2d.bias[[3, 10]])
    masked = copy.deepcopy(model)
    structure = build_structure(masked, x[:2])
    _zero_consumers(masked, structure, removed)
    with torch.no_grad(), renormalised(masked, structure, removed):
        diff = (pruned.double()(x.double()) - masked.double()(x.double())).abs().max().item()
    assert diff < 1e-9


def test_group_norm_ties_and_keeps_its_group_count():
    model, x = _model("norm-net")
    structure = build_structure(model, x[:2])
    stem = structure.group("stem")  # GroupNorm(4, 16): one channel of each group per unit
    assert (stem.size, stem.ties, stem.norms) == (4, 4, ["gn"])
    assert stem.norm_index["gn"][1] == (1, 5, 9, 13)
    pruned = copy.deepcopy(model)
    build_structure(pruned, x[:2]).remove({"stem": [1], "conv": [0, 5]})
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (4, 12)
    assert (pruned.inorm.num_groups, pruned.inorm.num_channels) == (10, 10)  # one per channel
