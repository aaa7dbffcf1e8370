"""Every registered baseline prunes every zoo model at 50 % and 95 % into a valid report."""

from __future__ import annotations

import pytest
import torch

import mipp
from helpers import make_model
from mipp.errors import MippError
from mipp.methods import BASELINE_NAMES, make_method
from mipp.report import PruneReport
from mipp.surgery.replay import apply_report
from mipp.surgery.structure import build_structure

SMALL = ["mlp", "lenet5", "vgg11-narrow", "tiny-resnet", "resnet20"]
REST = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet32", "resnet56", "resnet18", "resnet34",
        "resnet50"]  # fmt: skip


def _method(name: str, rounds_cap: int | None):
    default_rounds = make_method(name).rounds
    if rounds_cap is not None and default_rounds > rounds_cap:
        return make_method(name, rounds=rounds_cap)  # same loop, fewer rounds
    return make_method(name)


def _unnormalised(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """In-scope groups no normalisation layer scales (Network Slimming refuses them)."""
    groups = build_structure(model, x[:2]).in_scope("internal")
    return sorted(g.name for g in groups if not g.norm_index)


def _check(name: str, method: str, sparsity: float, rounds_cap: int | None, n: int) -> None:
    model, x = make_model(name, n=n)
    y = torch.arange(len(x)) % 3
    if method == "slimming" and _unnormalised(model, x):  # refused, with the groups named
        with pytest.raises(MippError, match="have none") as info:
            mipp.prune(model, (x, y), method=method, sparsity=sparsity)
        assert str(_unnormalised(model, x)[-1]) in str(info.value)
        return
    result = mipp.prune(model, (x, y), method=_method(method, rounds_cap), sparsity=sparsity,
                        batch_size=16)  # fmt: skip
    rep = result.report
    assert rep.method == method
    # within 1 point, or half a unit where one unit is more than 2 points (tiny-resnet: 28)
    slack = max(0.01, 0.5 / rep.units_before + 1e-9)
    ceiling = 1 - len(rep.groups) / rep.units_before  # a uniform ratio keeps one unit per layer
    if rep.options["allocation"] == "uniform" and sparsity > ceiling + slack:
        assert rep.achieved["units"] == pytest.approx(ceiling)
        assert "could not be met" in rep.notes[0]
    else:
        assert abs(rep.achieved["units"] - sparsity) <= slack, (rep.achieved, rep.notes)
    # the report describes the pruned model and replays onto a fresh one
    assert rep.params_after == mipp.count_params(result.model)
    for g in rep.groups:
        assert len(g.kept) + len(g.removed) == g.width_before
        assert g.collapsed == (g.width_after == 0)
        assert (g.name in rep.collapsed) == g.collapsed
    back = PruneReport.from_dict(rep.to_dict())
    fresh, _ = make_model(name, n=2)
    apply_report(fresh, back)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in result.model.parameters()]
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
@pytest.mark.parametrize("method", sorted(BASELINE_NAMES))
@pytest.mark.parametrize("name", ["lenet5", "tiny-resnet"])
def test_every_method_prunes_small_models(name, method, sparsity):
    _check(name, method, sparsity, rounds_cap=None, n=24)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.5, 0.95])
@pytest.mark.parametrize("method", sorted(BASELINE_NAMES))
@pytest.mark.parametrize("name", [n for n in SMALL if n not in ("lenet5", "tiny-resnet")] + REST)
def test_every_method_prunes_every_zoo_model(name, method, sparsity):
    _check(name, method, sparsity, rounds_cap=2, n=12)
