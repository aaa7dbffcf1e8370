"""The baseline framework: registry, allocation, layer collapse, sparsity matching, IMP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mipp
from mipp.errors import MippError, UnknownNameError
from mipp.methods import METHOD_NAMES, METHODS, make_method, method_options
from mipp.methods.allocation import allocate
from mipp.methods.baselines import IMP, L1Norm, RandomScores
from mipp.report import PruneReport
from mipp.surgery.replay import apply_report
from mipp.surgery.structure import build_structure
from mipp.zoo.data import ImageDataset, make_separable
from mipp.zoo.training import seeded


def _lenet(seed: int = 0):
    with seeded(seed):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
        x = torch.randn(256, 1, 28, 28)
    return net.eval(), x


def _units(removed):
    return sum(int(r.sum()) for r in removed)


def test_registry_names_every_method_and_rejects_unknown_names_and_options():
    assert set(METHOD_NAMES) == {
        "mipp", "random", "l1", "snip", "grasp", "synflow", "iterative-snip",
        "iterative-grasp", "thinet", "sosp-h", "imp", "hrank", "chip", "mean-activation",
        "apoz", "taylor", "taylor-weight", "slimming", "obd", "channel-pruning", "ccp",
        "ssl", "greg", "prospr", "kfac-obd", "tpp", "oto", "obs", "increg", "dcp", "sp-pai", "pfp",
    }  # fmt: skip
    assert all(METHODS[n].name == n for n in METHODS)
    with pytest.raises(UnknownNameError, match="valid methods: apoz, ccp, channel-pruning, chip"):
        make_method("variational-bayes")
    with pytest.raises(
        ValueError,
        match=r"no option.*banana.*valid options: allocation, rounds, normalize, cost_aware",
    ):
        make_method("l1", banana=1)
    with pytest.raises(ValueError, match=r"'l1' has no option\(s\) estimator"):
        make_method("l1", estimator="gaussian")
    with pytest.raises(ValueError, match=r"'mipp' has no option\(s\) allocation"):
        make_method("mipp", allocation="global")
    assert method_options("mipp") == (
        "estimator", "pool", "order", "min_keep", "confidence", "threshold", "cost_aware",
        "reconstruct", "residual", "stream_features", "paper",
    )  # fmt: skip
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        make_method("random", rounds=0)


def test_l1_removes_the_smallest_norm_filters():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 2 * 2, 2),
    )  # fmt: skip
    with torch.no_grad():
        for i, scale in enumerate([3.0, 0.5, 2.0, 0.1]):  # filter norms 27, 4.5, 18, 0.9
            net[0].weight[i] = scale
        for i, scale in enumerate([1.0, 0.2, 5.0, 0.3]):
            net[2].weight[i] = scale
    x = torch.randn(8, 1, 6, 6)
    res = mipp.prune(net, x, method=make_method("l1", allocation="uniform"), sparsity=0.5)
    removed = res.report.removed
    assert removed["0"] == [1, 3]  # the two smallest conv filters
    assert removed["2"] == [1, 3]
    assert res.model[0].out_channels == 2 and res.model[2].out_channels == 2
    assert res.model[2].in_channels == 2


def test_global_ranking_breaks_ties_and_removes_exactly_the_request():
    # Torch-Pruning's global ranking would drop every unit tied at the threshold
    scores = [torch.zeros(8), torch.zeros(8)]
    alive = [torch.ones(8, dtype=torch.bool)] * 2

    def measure(removed):
        return {"units": _units(removed) / 16, "params": 0.0, "macs": 0.0}

    removed, ach = allocate(
        scores, alive, names=["a", "b"], method="t", mode="global", sparsity=0.25,
        target="units", measure=measure,
    )  # fmt: skip
    assert ach["units"] == 0.25
    # ties: walk order first (group a), then unit index
    assert removed[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert not removed[1].any()


def test_global_normalisation_makes_layer_scales_irrelevant():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, generator=gen), torch.rand(6, generator=gen)
    alive = [torch.ones(10, dtype=torch.bool), torch.ones(6, dtype=torch.bool)]

    def measure(removed):
        return {"units": _units(removed) / 16, "params": 0.0, "macs": 0.0}

    def run(scores, normalize):
        removed, _ = allocate(
            scores, alive, names=["a", "b"], method="t", mode="global", sparsity=0.5,
            target="units", measure=measure, normalize=normalize,
        )  # fmt: skip
        return [r.tolist() for r in removed]

    assert run([a, b], "mean") == run([a * 1000, b], "mean")
    raw = run([a * 1000, b], "none")
    assert raw[1] == [True] * 6  # unnormalised, the small-scale layer goes first: collapse


def test_uniform_allocation_removes_the_same_share_of_every_layer():
    net, x = _lenet()
    res = mipp.prune(net, x, method=make_method("random", allocation="uniform"), sparsity=0.5)
    widths = res.report.widths
    assert widths == {"fc2": (84, 42), "fc1": (120, 60), "conv2": (16, 8), "conv1": (6, 3)}


def _collapsing_net():
    with seeded(0):
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[2].weight.mul_(1e-6)  # the middle layer's filters are tiny: raw L1 ranks them last
    return net.eval()


def test_layer_collapse_is_recorded_and_the_model_is_the_collapsed_network(tmp_path):
    net = _collapsing_net()
    x = torch.randn(64, 6)
    res = mipp.prune(net, x, method=L1Norm(normalize="none", allocation="global"), sparsity=0.5)
    rep = res.report
    assert rep.collapsed == ["2"]
    g = {gr.name: gr for gr in rep.groups}["2"]
    assert g.collapsed and g.width_after == 0 and len(g.kept) == 1
    assert rep.units_after == rep.units_before - 5 - int(rep.widths["0"][0] - rep.widths["0"][1])
    assert any("layer collapse" in n for n in rep.notes)
    # the collapsed layer carries no information: the output is the same for every input
    out = res.model(x)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    # and it stays dead under training: its placeholder's weights in and out remain zero
    model = res.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    y = torch.randint(0, 3, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert model[2].weight.abs().sum() == 0 and model[4].weight.abs().sum() == 0
    # the record survives JSON and replays onto a fresh model
    path = rep.save(tmp_path / "r.json")
    back = PruneReport.load(path)
    assert back.collapsed == ["2"] and {gr.name: gr.collapsed for gr in back.groups}["2"]
    fresh = apply_report(_collapsing_net(), back)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in res.model.parameters()]


def test_mean_normalisation_avoids_that_collapse():
    res = mipp.prune(_collapsing_net(), torch.randn(64, 6),
                     method=make_method("l1", allocation="global"), sparsity=0.5)  # fmt: skip
    assert res.report.collapsed == []


def test_pruned_model_equals_the_masked_original():
    net, x = _lenet()
    res = mipp.prune(
        net, x, method=make_method("random", allocation="global"), sparsity=0.7, seed=3
    )
    masked = __import__("copy").deepcopy(net)
    structure = build_structure(masked, x[:2])
    assert res.report.collapsed == ["conv1"]  # this seed collapses conv1: masked entirely
    structure.mask({g.name: g.removed + (g.kept if g.collapsed else []) for g in res.report.groups})
    with torch.no_grad():
        assert torch.allclose(res.model(x), masked(x), atol=1e-5)


@pytest.mark.parametrize("target", ["units", "params", "macs"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_matching_a_mipp_report_lands_within_one_point(target, allocation):
    net, x = _lenet()
    ref = mipp.prune(net, x, sparsity=0.7, target=target).report
    res = mipp.prune(
        net, x, method=make_method("l1", allocation=allocation), match=ref, target=target
    )
    assert res.report.requested == ref.achieved[target]
    assert abs(res.report.achieved[target] - ref.achieved[target]) <= 0.01
    assert res.report.achieved[target] == pytest.approx(
        1 - {"units": res.report.units_after / res.report.units_before,
             "params": res.report.params_after / res.report.params_before,
             "macs": res.report.macs_after / res.report.macs_before}[target]
    )  # fmt: skip


def test_random_is_seeded():
    net, x = _lenet()
    a = mipp.prune(net, x, method="random", sparsity=0.5, seed=1).report.removed
    b = mipp.prune(net, x, method="random", sparsity=0.5, seed=1).report.removed
    c = mipp.prune(net, x, method="random", sparsity=0.5, seed=2).report.removed
    assert a == b and a != c


def test_one_random_instance_gives_the_same_masks_in_every_run():
    """The round counter belongs to the run, not the instance (it used to carry over)."""
    net, x = _lenet()
    method = RandomScores(rounds=3)
    first = mipp.prune(net, x, method=method, sparsity=0.5, seed=1).report.removed
    second = mipp.prune(net, x, method=method, sparsity=0.5, seed=1).report.removed
    assert first == second


@pytest.mark.parametrize("name", ["variational", "aofp"])
def test_methods_named_but_not_implemented_are_refused_with_the_reason(name, tmp_path):
    from mipp.experiments.spec import load_spec
    from mipp.methods import NOT_IMPLEMENTED

    assert name not in METHOD_NAMES
    paper = {"variational": "Zhao et al. 2019", "aofp": "Ding et al. 2019"}[name]
    for call in (
        lambda: make_method(name),
        lambda: method_options(name),
        lambda: mipp.prune(nn.Linear(2, 2), torch.randn(4, 2), method=name, sparsity=0.5),
    ):
        with pytest.raises(UnknownNameError, match="is not implemented") as e:
            call()
        assert paper in str(e.value) and "\n" not in str(e.value)
        assert str(e.value) == f"method {name!r}: {NOT_IMPLEMENTED[name]}"
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'name = "x"\n[grid]\nmodels = ["mlp"]\ndatasets = ["digits"]\nregimes = ["pat"]\n'
        f'methods = ["{name}"]\nsparsities = [0.5]\nseeds = [0]\n'
    )
    with pytest.raises(MippError, match=f"grid.methods: '{name}': .*{paper}"):
        load_spec(config)


def test_extra_training_epochs_count_imps_retraining():
    assert IMP().extra_training_epochs() == 2  # 3 rounds, 1 epoch after each but the last
    assert IMP(rounds=4, epochs=2).extra_training_epochs() == 6
    assert IMP(retrain=lambda model: None).extra_training_epochs() == 0  # unknown budget
    trains = ("imp", "ssl", "greg", "increg", "tpp", "oto")  # methods that train by default
    assert all(make_method(n).extra_training_epochs() == 0 for n in METHOD_NAMES if n not in trains)
    assert (
        make_method("ssl").extra_training_epochs()
        == make_method("greg").extra_training_epochs()
        == 1
    )
    assert make_method("slimming", epochs=3).extra_training_epochs() == 3


def test_rounds_follow_the_exponential_schedule():
    net, x = _lenet()
    rep = mipp.prune(net, x, method=RandomScores(rounds=4), sparsity=0.9).report
    goals = [r["goal"] for r in rep.bisection]
    assert goals == pytest.approx([1 - 0.1 ** (r / 4) for r in range(1, 5)])
    assert [abs(r["units"] - r["goal"]) <= 0.01 for r in rep.bisection] == [True] * 4


def test_imp_retrains_between_rounds_and_removed_units_stay_removed():
    net, x = _lenet()
    y = torch.randint(0, 10, (len(x),))
    calls = []

    def retrain(model):
        calls.append(len(calls))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for i in range(0, 128, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()

    res = mipp.prune(net, (x, y), method=IMP(rounds=3, retrain=retrain), sparsity=0.8)
    assert len(calls) == 2  # after rounds 1 and 2, not after the last
    assert abs(res.report.achieved["units"] - 0.8) <= 0.01
    assert res.report.options["rounds"] == 3 and res.report.options["retrain"] == "callback"
    # the kept weights were re-trained: they differ from the original's kept slices
    kept = res.report.groups[-1].kept  # conv1
    assert not torch.allclose(res.model.conv1.weight, net.conv1.weight[kept])


def test_imp_default_retraining_uses_the_labelled_data():
    x, y = make_separable(512, num_classes=3, dim=10, seed=0)
    ds = ImageDataset(x, y, num_classes=3, name="toy")
    with seeded(0):
        net = mipp.create_model("mlp", in_channels=10, input_size=1, num_classes=3, widths=(32, 16))
    res = mipp.prune(net, ds, method="imp", sparsity=0.5)
    assert abs(res.report.achieved["units"] - 0.5) <= 0.01
    with pytest.raises(MippError, match=r"imp.*labelled data"):
        mipp.prune(net, x, method="imp", sparsity=0.5)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"method": "l1"}, "needs sparsity= \\(or match=\\)"),
        ({"method": "l1", "sparsity": 1.0}, "sparsity must be in \\[0, 1\\), got 1.0"),
        ({"method": "nope", "sparsity": 0.5}, "unknown method 'nope'"),
        ({"method": 3, "sparsity": 0.5}, "method must be a name"),
    ],
)
def test_bad_baseline_options_are_named(options, needle):
    net, x = _lenet()
    with pytest.raises((ValueError, TypeError, MippError), match=needle):
        mipp.prune(net, x[:32], **options)


def test_bad_allocation_fails_when_the_method_is_built():
    with pytest.raises(ValueError, match="allocation must be one of"):
        make_method("l1", allocation="local")
    with pytest.raises(ValueError, match="one-shot; 'synflow' was given rounds=100"):
        make_method("synflow", allocation="widths")


def test_match_errors_are_named():
    net, x = _lenet()
    ref = mipp.prune(net, x, sparsity=0.5).report
    with pytest.raises(ValueError, match="either sparsity= or match="):
        mipp.prune(net, x, method="l1", sparsity=0.5, match=ref)
    with pytest.raises(ValueError, match="scope='internal'"):
        mipp.prune(net, x, method="l1", match=ref, scope="all")


def test_input_model_is_untouched_and_report_round_trips(tmp_path):
    net, x = _lenet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = mipp.prune(net, x, method=make_method("l1", allocation="global"), sparsity=0.6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    back = PruneReport.load(res.report.save(tmp_path / "r.json"))
    assert back.method == "l1" and back.options["allocation"] == "global"
    assert back.removed == res.report.removed
    assert all(
        math.isclose(a, b) for g, h in zip(back.groups, res.report.groups, strict=True)
        for a, b in zip(g.scores, h.scores, strict=True)
    )  # fmt: skip


def test_widths_allocation_keeps_the_matched_widths_and_the_highest_scores():
    net, x = _lenet()
    ref = mipp.prune(net, x, sparsity=0.7).report
    res = mipp.prune(net, x, method=make_method("l1", allocation="widths"), match=ref).report
    assert res.widths == ref.widths and res.options["allocation"] == "widths"
    for g in res.groups:  # inside each layer, the kept units are those of largest L1 norm
        top = sorted(range(g.width_before), key=lambda j: (-g.scores[j], j))[: g.width_after]
        assert sorted(top) == g.kept
    rnd = mipp.prune(net, x, method=make_method("random", allocation="widths"), match=ref).report
    assert rnd.widths == ref.widths and rnd.removed != res.removed


def test_widths_allocation_needs_a_matched_report():
    net, x = _lenet()
    with pytest.raises(ValueError, match="pass it"):
        mipp.prune(net, x, method=make_method("l1", allocation="widths"), sparsity=0.5)
