"""Provable Filter Pruning: sensitivities by hand, the sampling stream against its closed
forms, the ε search, the unbiased reweighting, seeding and the deterministic variant."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mipp
from helpers import make_ctx, make_model
from mipp.methods import make_method
from mipp.methods.base import Budget
from mipp.methods.baselines.sampling import (
    ProvableFilterPruning,
    epsilon_for,
    expected_entries,
    first_arrivals,
    multiplier,
    sample_size,
    sensitivities,
    stream_counts,
)
from mipp.testing.methods import check_method
from mipp.zoo.training import seeded

P = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)


def test_sensitivities_by_hand_split_positive_and_negative_parts():
    z = torch.tensor([[1.0, 2, 1], [3, 1, 0], [0, 2, 2], [0, 1, 0]], dtype=torch.float64)
    # rows / row sums: (¼ ½ ¼), (¾ ¼ 0), (0 ½ ½), (0 1 0) → column maxima
    torch.testing.assert_close(sensitivities(z), torch.tensor([0.75, 1.0, 0.5], dtype=z.dtype))
    z[1, 2] = -2.0  # the only negative term of its row: all of that row's negative part
    torch.testing.assert_close(sensitivities(z), torch.tensor([0.75, 1.0, 1.0], dtype=z.dtype))
    assert sensitivities(torch.zeros(0, 3)).tolist() == [0.0, 0.0, 0.0]
    assert sensitivities(torch.zeros(4, 3)).tolist() == [0.0, 0.0, 0.0]  # no part of any sign


def _hand_mlp() -> nn.Sequential:
    """a = ReLU(x) (identity first layer), then W2 = [[1, 2, 1], [3, 1, 0]] with a bias."""
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 2, 1], [3, 1, 0]]))
        net[2].bias.copy_(torch.tensor([5.0, -5.0]))  # excluded from the relative importance
    return net.eval()


def test_scores_are_the_empirical_sensitivities_of_a_hand_built_mlp():
    x = torch.tensor([[1.0, 1, 1], [0, 1, 2]])
    # x1: out0 (1 2 1)/4, out1 (3 1 0)/4; x2: out0 (0 2 2)/4, out1 (0 1 0)/1
    ctx = make_ctx(_hand_mlp(), x)
    got = ProvableFilterPruning(samples_per_image=64).scores(ctx)["0"]  # both outputs drawn
    torch.testing.assert_close(got, torch.tensor([0.75, 1.0, 0.5], dtype=torch.float64))


def test_first_arrivals_are_geometric_and_stream_counts_binomial():
    gen = torch.Generator().manual_seed(0)
    n, m = 3000, 7
    arrivals = torch.stack([first_arrivals(P, gen) for _ in range(n)])
    counts = torch.stack([stream_counts(P, a, m, gen) for a in arrivals])
    assert bool(torch.isinf(arrivals[:, 4]).all()) and bool(
        (arrivals[:, :4].min(1).values == 1).all()
    )
    # marginally T_j ~ Geom(p_j): mean 1/p_j, sd √(1 − p_j)/p_j
    p = P[:4]
    se = (1 - p).sqrt() / p / math.sqrt(n)
    assert bool(((arrivals[:, :4].mean(0) - 1 / p).abs() < 5 * se).all())
    # the first m draws: they sum to m, every arrived unit counts, count_j ~ Binomial(m, p_j)
    assert bool((counts.sum(1) == m).all())
    assert torch.equal(counts > 0, arrivals <= m)
    se = (m * P * (1 - P) / n).sqrt()
    assert bool(((counts.mean(0) - m * P).abs() <= 5 * se + 1e-12).all())
    kept = (counts > 0).double().mean(0)  # P(T_j ≤ m) = 1 − (1 − p_j)^m
    assert bool(((kept - (1 - (1 - P) ** m)).abs() < 0.04).all())


def test_reweighted_preactivation_is_unbiased_for_a_fixed_number_of_draws():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64).abs()  # positive contributions
    p = sensitivities(z) / sensitivities(z).sum()
    m, n = 4, 3000
    est = []
    for _ in range(n):
        c = stream_counts(p, first_arrivals(p, gen), m, gen)
        est.append(z @ (c / (m * p)))  # Σ_j count_j / (m p_j) z_j per row
    est = torch.stack(est)
    se = est.std(0) / math.sqrt(n)
    assert bool(((est.mean(0) - z.sum(1)).abs() < 5 * se).all())
    assert bool((est.std(0) > 0).all())  # a real estimator, not the identity


def test_sample_size_is_the_bound_and_grows_with_the_sensitivity_sum():
    delta = 8 * math.exp(-3)  # log(8η/δ) = 3 with η = 1
    assert multiplier(1.0, delta, 1) == pytest.approx(24.0)  # (6 + 2)·3 / 1
    assert sample_size(2.5, 1.0, delta, 1) == 60
    assert sample_size(5.0, 1.0, delta, 1) == 120
    assert sample_size(2.5, 2.0, delta, 1) == 18  # ⌊10·3·2.5 / 4⌋
    assert epsilon_for(24.0, delta, 1) == pytest.approx(1.0)
    assert epsilon_for(0.0, delta, 1) == math.inf
    sizes = [sample_size(s, 0.5, 1e-6, 100) for s in (1.0, 2.0, 4.0, 8.0)]
    assert sizes == sorted(sizes) and sizes[-1] > 7 * sizes[0]


def test_expected_entries_keep_round_expected_distinct_units():
    got = expected_entries(P, P)
    expect = [1.0, 2.0, 5.0, 17.0, math.inf]  # smallest m with Σ 1 − (1 − p)^m ≥ r − ½
    assert got.tolist() == expect

    def distinct(m: float) -> float:
        return float((1 - (1 - P) ** m).sum())

    for r, mr in enumerate(expect[:4], start=1):
        assert distinct(mr) >= r - 0.5 and (mr == 1 or distinct(mr - 1) < r - 0.5)
    # ties in the scores go to the lower index; the ranking is by the scores given
    assert expected_entries(P, torch.tensor([0.0, 1, 1, 2, 0])).tolist()[:4] == [17, 2, 5, 1]


def _decided(name: str, sparsity: float, *, target: str = "units", **options):
    model, x = make_model(name, n=32)
    ctx = make_ctx(model, x, batch_size=16)
    method = ProvableFilterPruning(**options)
    decision = method.decide(ctx, Budget(sparsity=sparsity, target=target))  # type: ignore[arg-type]
    return model, ctx, decision


@pytest.mark.parametrize("sparsity", [0.5, 0.99])
def test_the_epsilon_search_keeps_the_units_that_enter_by_c_star(sparsity):
    _, ctx, decision = _decided("lenet5", sparsity)
    units = ctx.units_total
    assert abs(decision.achieved["units"] - sparsity) <= 0.5 / units
    cache = ctx.cache["pfp"]
    c = cache["multiplier"]
    trace = decision.trace[0]
    assert trace["multiplier"] == c and trace["epsilon"] == pytest.approx(
        epsilon_for(c, 1e-6, units)
    )
    for g in ctx.groups:
        s = cache["sensitivity"][g.name]
        removed = decision.removed[g.name]
        entry = cache["entry"][g.name]
        assert torch.equal(removed, entry > c)  # kept ⇔ c_j = T_j / S_ℓ ≤ c*
        m = cache["samples"][g.name]
        total = float(s.sum())
        assert abs(m - c * total) < 1 + 1e-9  # m_ℓ = ⌊c* S_ℓ⌋ (up to rounding at c_j = c*)
        arrivals = entry * total
        assert torch.equal(~removed, arrivals <= m + 1e-6)  # the distinct units of m draws
        assert decision.groups[g.name]["scores"] == s.tolist()
    if sparsity > 0.9:
        collapsed = [g.name for g in ctx.groups if bool(decision.removed[g.name].all())]
        assert collapsed and all(cache["samples"][n] == 0 for n in collapsed)
    by_total = sorted(ctx.groups, key=lambda g: float(cache["sensitivity"][g.name].sum()))
    draws = [cache["samples"][g.name] for g in by_total]
    assert draws == sorted(draws)  # one ε for all layers: m_ℓ grows with S_ℓ


@pytest.mark.parametrize("target", ["params", "macs"])
def test_the_epsilon_search_meets_a_params_or_macs_budget(target):
    _, _, decision = _decided("lenet5", 0.5, target=target)
    assert abs(decision.achieved[target] - 0.5) <= 0.01 and not decision.notes


def test_reweighting_multiplies_each_kept_units_consumer_column_by_count_over_m_p():
    with seeded(0):
        net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
        x = torch.randn(64, 6)
    ctx = make_ctx(net, x)
    before = ctx.model[2].weight.detach().clone()
    decision = ProvableFilterPruning().decide(ctx, Budget(sparsity=0.5))
    cache = ctx.cache["pfp"]
    units, w = cache["reweight"]["0"]
    kept = (~decision.removed["0"]).nonzero().flatten()
    assert torch.equal(units, kept) and len(kept) == 6
    after = ctx.model[2].weight.detach()
    torch.testing.assert_close(after[:, kept], before[:, kept] * w.float()[None, :])
    # every draw landed on a kept unit: Σ_j p_j · count_j / (m p_j) = Σ count_j / m = 1
    s = cache["sensitivity"]["0"]
    p = s / s.sum()
    assert float((p[kept] * w).sum()) == pytest.approx(1.0)
    assert bool((w > 0).all()) and not torch.allclose(w, torch.ones_like(w))


def test_same_seed_gives_the_same_pruning_and_another_seed_another():
    with seeded(0):
        net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        x = torch.randn(64, 6)

    def run(seed: int):
        res = mipp.prune(net, x, method="pfp", sparsity=0.5, seed=seed, compensate=False)
        return res.report.removed, res.model[2].weight.detach()

    (r0, w0), (r1, w1), (r2, w2) = run(0), run(0), run(1)
    assert r0 == r1 and torch.equal(w0, w1)
    assert r0 != r2 or not torch.equal(w0, w2)


def test_the_deterministic_variant_keeps_the_most_sensitive_units_unweighted():
    _, ctx, decision = _decided("lenet5", 0.5, sample=False)
    assert not ctx.cache["pfp"]["reweight"]
    for g in ctx.groups:
        s = ctx.cache["pfp"]["sensitivity"][g.name]
        kept = int((~decision.removed[g.name]).sum())
        top = torch.argsort(-s, stable=True)[:kept]
        assert sorted(top.tolist()) == (~decision.removed[g.name]).nonzero().flatten().tolist()
        m = ctx.cache["pfp"]["samples"][g.name]
        assert kept == round(float((1 - (1 - s / s.sum()) ** m).sum()))  # round(E[#distinct])
    assert check_method(lambda: make_method("pfp", sample=False)) == []


def test_other_allocations_rank_the_sensitivities_without_reweighting():
    method = make_method("pfp", allocation="uniform")
    assert method.options()["allocation"] == "uniform" and method.options()["reweight"] is False
    model, x = make_model("lenet5", n=32)
    res = mipp.prune(model, x, method=method, sparsity=0.5, compensate=False)
    for g in res.report.groups:
        worst = sorted(range(g.width_before), key=lambda j: (g.scores[j], j))
        assert sorted(g.removed) == sorted(worst[: len(g.removed)])
    assert check_method(lambda: make_method("pfp", allocation="global")) == []


def test_reweighting_is_caught_by_the_exact_check_and_otherwise_conforms():
    assert check_method("pfp", exact=False) == []
    assert check_method("pfp", exact=False, labels=False, sparsity=0.9) == []
    (problem,) = check_method("pfp", exact=True)
    assert problem.startswith("the pruned model differs")


def test_the_input_model_is_left_untouched_by_the_reweighting():
    model, x = make_model("lenet5", n=16)
    state = copy.deepcopy(model.state_dict())
    mipp.prune(model, x, method="pfp", sparsity=0.5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allocation": "local"}, "allocation must be one of"),
        ({"rounds": 2}, "allocation 'pfp' is one-shot"),
        ({"sample": 1}, "sample must be True or False"),
        ({"reweight": "yes"}, "reweight must be True, False or None"),
        ({"sample": False, "reweight": True}, "reweight=True needs sampled units"),
        ({"allocation": "global", "reweight": True}, "reweight=True needs sampled units"),
        ({"delta": 0.0}, r"delta must be a number in \(0, 1\)"),
        ({"samples_per_image": 0}, "samples_per_image must be an integer >= 1"),
    ],
)
def test_bad_options_fail_when_the_method_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        make_method("pfp", **options)


def test_options_are_recorded_resolved():
    assert make_method("pfp").options() == {
        "rounds": 1, "normalize": "mean", "allocation": "pfp", "cost_aware": False,
        "samples_per_image": 10, "images": 256, "sample": True, "reweight": True, "delta": 1e-6,
    }  # fmt: skip
    assert make_method("pfp", sample=False).options()["reweight"] is False
    assert make_method("pfp", allocation="uniform", rounds=3).rounds == 3
