"""The pipeline's verification: a pruned model is the original with exactly the reported units
removed, or no model is returned (issue 14 §1)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import make_model
from mipp import prune
from mipp.errors import InvalidOptionError, MippError, PruningVerificationError
from mipp.surgery.structure import ReusedModuleError, build_structure
from mipp.surgery.verify import mismatch, verify_removal
from mipp.zoo.training import seeded

REORDERINGS = ("flip", "roll", "shuffle")


class ThreeConv(nn.Module):
    """c1 → c2 → [reordering] → c3 → fc: the reordering sits between group c2 and c3."""

    def __init__(self, reorder: str | None = None) -> None:
        super().__init__()
        self.reorder = reorder
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)))
        if self.reorder == "flip":
            h = h.flip(1)
        elif self.reorder == "roll":
            h = torch.roll(h, 1, dims=1)
        elif self.reorder == "shuffle":  # ShuffleNet's channel shuffle, 2 groups
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        h = torch.relu(self.c3(h))
        return self.fc(h.mean((2, 3)))


class SharedLinear(nn.Module):
    """``f`` is applied twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(6, 12)
        self.a = nn.Linear(12, 10)
        self.f = nn.Linear(10, 10)
        self.o = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(torch.relu(self.b(x))))
        return self.o(torch.relu(self.f(torch.relu(self.f(h)))))


def _net(reorder: str | None = None) -> tuple[nn.Module, torch.Tensor]:
    with seeded(0):
        model = ThreeConv(reorder)
        for bn in (model.b1, model.b2):  # non-trivial BatchNorm: its shift must go too
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.data.normal_(0, 0.2)
        x = torch.randn(96, 3, 8, 8)
    return model.eval(), x


def _prune(model, x, method, **kw):
    return prune(model, x, method=method, sparsity=0.5, calib_samples=96, batch_size=96, **kw)


@pytest.mark.parametrize("method", ["mipp", "l1"])
@pytest.mark.parametrize("reorder", REORDERINGS)
def test_a_channel_reordering_is_refused_naming_its_group(reorder, method):
    model, x = _net(reorder)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningVerificationError, match=r"group 'c2' .*exclude=\['c2'\]") as err:
        _prune(model, x, method)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("method", ["mipp", "l1"])
def test_the_same_net_without_the_reordering_prunes(method):
    model, x = _net()
    result = _prune(model, x, method, compensate=False, recalibrate_bn=False)
    assert result.report.removed.get("c2")  # the group the reordering would break
    reference = copy.deepcopy(model)  # verified again, outside the pipeline
    verify_removal(reference, result.model, build_structure(reference, x[:2]),
                   result.report.removed, x[:8])  # fmt: skip


@pytest.mark.parametrize("reorder", REORDERINGS)
def test_excluding_the_named_group_prunes_the_rest(reorder):
    model, x = _net(reorder)
    result = _prune(model, x, "l1", exclude=["c2"])
    assert [g.name for g in result.report.groups] == ["c3", "c1"]
    assert result.report.options["exclude"] == ["c2"]
    assert result.model.c2.out_channels == 8 and result.model.c1.out_channels < 8


def test_opting_out_returns_an_unverified_model():
    model, x = _net("flip")
    result = _prune(model, x, "l1", verify=False, compensate=False)
    assert result.report.options["verify"] is False
    assert any(n.startswith("unverified") for n in result.report.notes)
    reference = copy.deepcopy(model)  # ... and it is indeed wrong
    with pytest.raises(PruningVerificationError, match="group 'c2'"):
        verify_removal(reference, result.model, build_structure(reference, x[:2]),
                       result.report.removed, x[:8])  # fmt: skip


def test_a_reused_module_is_named_before_any_data_runs():
    with seeded(0):
        model, x = SharedLinear().eval(), torch.randn(64, 6)
    for scope in ("internal", "all"):
        with pytest.raises(ReusedModuleError, match=r"module 'f' \(Linear\) is called 2 times"):
            prune(model, x, sparsity=0.3, scope=scope, calib_samples=64)


@pytest.mark.parametrize("method", ["mipp", "l1"])
def test_an_excluded_reused_module_is_left_whole(method):
    with seeded(0):
        model, x = SharedLinear().eval(), torch.randn(128, 6)
    result = prune(model, x, method=method, sparsity=0.3, calib_samples=128, exclude=["f"])
    assert [g.name for g in result.report.groups] == ["b"]  # a and f are tied through f
    assert result.model.f.weight.shape == (10, 10)


@pytest.mark.parametrize(("name", "n"), [("lenet5", 512), ("tiny-resnet", 256)])
def test_verification_does_not_change_results(name, n):
    model, x = make_model(name, n=n, input_size=16)
    state = copy.deepcopy(model.state_dict())
    on = prune(model, x, sparsity=0.5, scope="all", batch_size=128)
    off = prune(model, x, sparsity=0.5, scope="all", batch_size=128, verify=False)
    assert on.report.removed == off.report.removed
    assert on.report.removed  # something was removed, and verified
    a, b = on.model.state_dict(), off.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert "verify" in on.report.timings and "verify" not in off.report.timings


def test_bad_options_are_named():
    model, x = _net()
    with pytest.raises(InvalidOptionError, match="verify must be True or False, got 'yes'"):
        _prune(model, x, "l1", verify="yes")
    with pytest.raises(InvalidOptionError, match=r"write exclude=\['c2'\]"):
        _prune(model, x, "l1", exclude="c2")
    with pytest.raises(InvalidOptionError, match=r"exclude names 'c9'.*c1, b1, c2"):
        _prune(model, x, "l1", exclude=["c9"])
    with pytest.raises(MippError, match="no prunable unit groups"):
        _prune(model, x, "l1", exclude=["c1", "c2", "c3"])


def test_mismatch_is_relative_to_the_reference_scale():
    want = torch.tensor([[1000.0, -2.0], [0.5, 0.0]])
    assert mismatch(want + 0.09, want) is None  # 0.09 <= 1e-4 * 1000
    assert mismatch(want + 0.11, want) == pytest.approx((0.11, 0.1), rel=1e-3)
    small = want * 1e-6  # the scale of the output sets the tolerance: no absolute floor
    assert mismatch(small + 1e-5, small) is not None
    assert mismatch(torch.zeros(3), torch.zeros(3)) is None
    assert mismatch(torch.zeros(3), torch.zeros(4))[0] == math.inf
    nan = torch.tensor([float("nan"), 1.0])
    assert mismatch(nan.clone(), nan) is None
    assert mismatch(torch.tensor([0.0, 1.0]), nan) is not None
    half = torch.tensor([100.0], dtype=torch.float16)
    assert mismatch(half + 0.5, half) is None  # 16-bit floats: 1e-2 relative
