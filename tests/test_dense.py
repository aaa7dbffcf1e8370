"""DenseNet-style concatenations read through each reader's own BatchNorm: a unit is described
once, by its value in the concatenation, however many later layers re-normalise it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mipp
from mipp.methods.targets import group_columns
from mipp.surgery.capture import capture_activations
from mipp.surgery.structure import build_structure
from mipp.zoo.training import seeded


class _Layer(nn.Module):
    """torchvision's dense layer in small: cat → BN → ReLU → 1×1 conv → BN → ReLU → 3×3 conv."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 8, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, growth, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(F.relu(self.norm1(torch.cat(feats, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class TinyDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList([_Layer(6 + 4 * i, 4) for i in range(3)])
        self.norm, self.fc = nn.BatchNorm2d(18), nn.Linear(18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        out = F.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _model() -> TinyDense:
    with seeded(0):
        net = TinyDense()
        for m in net.modules():  # readers normalise the same channels differently
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 2.0)
                m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_readers_of_a_concatenation_through_batchnorm_are_found():
    net = _model()
    s = build_structure(net, torch.randn(2, 3, 8, 8))
    assert s.read_through == {f"layers.{i}.conv1": f"layers.{i}.norm1" for i in range(3)}
    modules = s.recorded_modules({"layers.1.conv1", "layers.1.conv2", "fc"})
    assert modules["layers.1.conv1"] is net.layers[1].norm1
    assert modules["layers.1.conv2"] is net.layers[1].conv2 and modules["fc"] is net.fc


def test_a_unit_read_by_several_layers_is_one_feature_its_concatenation_value():
    """The stem's 6 channels are read by all three layers' conv1 (through three different
    BatchNorms) and by the classifier: X holds the concatenation's channel means once (f=1)
    plus the classifier's own reading, not one block per reader; the target holds each
    consumer's output as its next layer reads it, the shared concatenation block once."""
    net = _model()
    x = torch.randn(16, 3, 8, 8)
    s = build_structure(net, x[:2])
    groups = [g for g in s.groups if g.kind == "internal"]
    wanted = set(s.readers) | {
        n for g in groups for c in g.consumers for n in s.next_layers[c.layer]
    }
    acts = capture_activations(net, [x], s.recorded_modules(wanted))
    cols = dict(zip([g.name for g in groups], group_columns(s, groups, acts, "mean"), strict=True))
    stem_x, stem_y, owner, _ = cols["stem"]
    assert stem_x.shape == (16, 6, 2)  # the concatenation's value + the classifier's input
    want = net.stem(x).mean((2, 3))
    torch.testing.assert_close(stem_x[:, :, 0], want, rtol=1e-5, atol=1e-6)
    # conv1 of each layer → its 8 channels as conv2 reads them; fc → the 5 logits
    assert stem_y.shape == (16, 3 * 8 + 5) and (owner == -1).sum() == 5
    # layer 0's conv2 (4 units) is read by layers 1, 2 and the classifier: 2 features, and
    # its consumers' outputs as read next (layer 1, 2 conv1 → conv2: 8 each; fc: 5)
    l0_x, l0_y, _, _ = cols["layers.0.conv2"]
    assert l0_x.shape == (16, 4, 2) and l0_y.shape == (16, 8 + 8 + 5)
    # layer 0's conv1 (8 units) → conv2, whose 4 channels layers 1 and 2 read through their
    # norms (one shared block of 4) and the classifier reads (its own 4): 8 columns, not 12
    assert cols["layers.0.conv1"][1].shape == (16, 4 + 4)


def test_mipp_prunes_a_dense_network_and_it_still_runs():
    net = _model()
    x = torch.randn(64, 3, 8, 8)
    result = mipp.prune(net, x, sparsity=0.5, calib_samples=64)
    assert 0.4 <= result.report.achieved["units"] <= 0.6
    assert result.model(x[:2]).shape == (2, 5)
