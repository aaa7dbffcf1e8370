"""Cost-aware allocation: MIPP's threshold scaled by what each unit costs (docs/METHOD.md §4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mipp
from mipp.estimators import LinearEstimator
from mipp.methods import MIPP
from mipp.methods.selection import terc
from mipp.surgery.costs import CostModel
from mipp.surgery.structure import build_structure


def _two_units(n: int = 4000):
    """Two independent units; unit 0 carries slightly more of the target than unit 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = 1.0 * x[:, :1] + 0.9 * x[:, 1:] + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def test_expensive_unit_with_slightly_more_information_goes_first():
    x, y = _two_units()
    est = LinearEstimator()
    plain = terc(est.start(est.prepare(x, y)), threshold=0.48, order="index")
    # cost-blind: the threshold lies between the two Δs → the less informative unit 1 goes
    assert plain.support.tolist() == [True, False]
    d0, d1 = plain.relative_deltas[0].item(), plain.relative_deltas[1].item()
    assert d0 > d1
    # unit 0 costs 3× the mean, unit 1 a third of it: the trade flips the choice
    scaled = terc(
        est.start(est.prepare(x, y)),
        threshold=0.48,
        order="index",
        scale=torch.tensor([1.5, 0.5], dtype=torch.float64),
    )
    assert scaled.support.tolist() == [False, True]


def test_scale_is_checked():
    x, y = _two_units(100)
    est = LinearEstimator()
    with pytest.raises(ValueError, match="scale must be 2 finite values >= 0"):
        terc(est.start(est.prepare(x, y)), threshold=0.1, scale=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="threshold mode only"):
        terc(est.start(est.prepare(x, y)), confidence=0.9, scale=torch.ones(2))


def test_unit_costs_are_the_first_difference_of_the_cost_model():
    """Removing one unit saves exactly what unit_costs says, for params and MACs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 3),
    )  # fmt: skip
    x = torch.randn(4, 2, 8, 8)
    st = build_structure(net, x)
    costs = CostModel(st, x)
    removed = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in st.groups}
    removed[st.groups[-1].name][0] = True  # some units already gone downstream
    params0, macs0 = costs(removed)
    for kind, before in (("params", params0), ("macs", macs0)):
        per = costs.unit_costs(removed, kind)
        for g in st.groups:
            for j in range(g.size):
                if removed[g.name][j]:
                    continue
                trial = {k: v.clone() for k, v in removed.items()}
                trial[g.name][j] = True
                after = costs(trial)[0 if kind == "params" else 1]
                assert before - after == pytest.approx(float(per[g.name][j]), abs=1.0), (g, j)


def test_cost_aware_reaches_a_macs_target_with_fewer_units_removed():
    """On LeNet-5 the fully connected units are cheap in MACs: the cost-blind threshold strips
    them to reach a MACs target; the cost-aware one takes the MACs from the convolutions."""
    with mipp.seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    blind = mipp.prune(net, x, method=MIPP(cost_aware=False), sparsity=0.4, target="macs")
    aware = mipp.prune(net, x, method=MIPP(), sparsity=0.4, target="macs")
    assert aware.report.options["cost_aware"] == "macs"
    assert blind.report.options["cost_aware"] is None
    for r in (blind, aware):  # one LeNet-5 conv filter moves the MACs by up to 2 %
        assert abs(r.report.achieved["macs"] - 0.4) <= 0.03
    assert aware.report.achieved["units"] < blind.report.achieved["units"]


def test_units_budget_is_cost_blind_by_default():
    with mipp.seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    a = mipp.prune(net, x, method=MIPP(), sparsity=0.5).report
    b = mipp.prune(net, x, method=MIPP(cost_aware=False), sparsity=0.5).report
    assert a.options["cost_aware"] is None
    assert [g.kept for g in a.groups] == [g.kept for g in b.groups]


def test_cost_aware_option_is_checked():
    with pytest.raises(ValueError, match="cost_aware must be True, False or None"):
        MIPP(cost_aware="yes")


# ------------------------------------------------------------------------- latency target


def _table_for(net, x):
    from mipp.surgery.costs import LatencyTable

    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    # a made-up table (times are a benchmark's business): 1 ms per layer, 1 ms fixed
    return LatencyTable({n: 1e-3 for n in names}, 1e-3 * (len(names) + 1), 64, "cpu")


def test_predicted_latency_is_bilinear_in_the_kept_widths():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(4, 4)
    st = build_structure(net, x)
    costs = CostModel(st, x, latency=_table_for(net, x))
    none = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in st.groups}
    assert costs.latency(none) == pytest.approx(costs.latency_before)
    half = {k: v.clone() for k, v in none.items()}
    half["0"][:4] = True  # layer 0 keeps 4 of 8 outputs, layer 2 reads 4 of 8 inputs
    # 1 ms fixed + layer 0: 1 ms × 4/8 + layer 2: 1 ms × 4/8 + layer 4: 1 ms
    assert costs.latency(half) == pytest.approx(1e-3 * (1 + 0.5 + 0.5 + 1))
    per = costs.unit_costs(none, "latency")
    for g in st.groups:
        trial = {k: v.clone() for k, v in none.items()}
        trial[g.name][0] = True
        saved = costs.latency(none) - costs.latency(trial)
        assert saved == pytest.approx(float(per[g.name][0]))


def test_measured_latency_table_has_every_layer_and_restores_the_model():
    from mipp.surgery.costs import measure_layer_latency

    with mipp.seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    net.train()
    table = measure_layer_latency(net, torch.randn(3, 1, 28, 28), batch_size=5, repeats=2)
    layers = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert layers <= set(table.per_layer) and table.batch_size == 5
    assert all(v >= 0 for v in table.per_layer.values()) and table.total > 0
    assert net.training and not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        measure_layer_latency(net, torch.randn(3, 1, 28, 28), batch_size=0)


def test_a_latency_target_is_met_on_the_predicted_latency():
    with mipp.seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    x = torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    rep = mipp.prune(net, x, sparsity=0.3, target="latency", latency_batch=8).report
    assert set(rep.achieved) == {"units", "params", "macs", "latency"}
    assert abs(rep.achieved["latency"] - 0.3) <= 0.03 or any(
        "could not be met" in n for n in rep.notes
    )
    assert rep.options["latency_batch"] == 8 and rep.options["cost_aware"] == "latency"
    l1 = mipp.prune(net, x, method="l1", match=rep, target="latency", latency_batch=8).report
    assert "latency" in l1.achieved
    with pytest.raises(ValueError, match="latency_batch must be an integer >= 1"):
        mipp.prune(net, x, sparsity=0.3, target="latency", latency_batch=0)
