"""Discrimination-aware Channel Pruning: known answers for its pieces and its greedy order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mipp
from mipp.errors import MippError
from mipp.methods import make_method
from mipp.methods.baselines.discrimination import dcp_order, fit_probe, pooled_unit_features
from mipp.zoo.training import seeded


def test_pooled_features_average_each_units_channels_over_positions():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    z = pooled_unit_features(x, ((0,), (1, 2)))  # unit 1 owns two channels
    means = x.mean((2, 3))
    torch.testing.assert_close(z[:, 0], means[:, 0])
    torch.testing.assert_close(z[:, 1], (means[:, 1] + means[:, 2]) / 2)
    flat = torch.randn(4, 6, dtype=torch.float64)  # a Linear's input: features as they are
    torch.testing.assert_close(pooled_unit_features(flat, ((5,), (0, 1)))[:, 0], flat[:, 5])


def test_probe_is_the_ridge_logistic_regression_of_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    z = torch.rand(60, 4, generator=gen, dtype=torch.float64)
    z[0, 0] = 1.0  # max |z| = 1, so the probe's scale is 1
    y = (z[:, 0] + 0.5 * z[:, 1] > 0.8).long() + (z[:, 2] > 0.7).long()
    ridge = 0.05
    v, c = fit_probe(z, y, 3, ridge=ridge)
    # scikit-learn minimises ½‖w‖² + C Σ CE, i.e. our (1/n) Σ CE + ridge ‖w‖²/2 at C = 1/(n ridge)
    ref = LogisticRegression(C=1 / (len(z) * ridge), tol=1e-12, max_iter=10_000).fit(z, y)
    torch.testing.assert_close(v, torch.as_tensor(ref.coef_), atol=1e-5, rtol=1e-5)
    # logits are defined up to a shift per sample: compare centred intercepts
    theirs = torch.as_tensor(ref.intercept_ - ref.intercept_.mean())
    torch.testing.assert_close(c - c.mean(), theirs, atol=1e-5, rtol=1e-5)


def test_without_the_auxiliary_loss_orthogonal_units_join_by_contribution():
    # orthogonal columns: ∂M/∂β_j = −‖x̂_j‖²/‖ŷ‖² outside A and the re-fit gives β_A = 1, so
    # units join in decreasing ‖x̂_j‖²; a dead unit never competes
    x = torch.zeros(8, 4, dtype=torch.float64)
    x[0:2, 0], x[2:4, 1], x[4:6, 2], x[6:8, 3] = 1.0, 3.0, 2.0, 0.5
    z = torch.randn(10, 4, dtype=torch.float64)
    y = torch.arange(10) % 2
    probe = (torch.randn(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    alive = torch.tensor([True, True, True, False])
    order = dcp_order(x, z, y, probe, alive, weight=0.0)
    assert order.tolist() == [1, 2, 0]


def test_the_auxiliary_gradient_picks_the_discriminative_unit_the_reconstruction_ignores():
    # units 0 and 1 contribute nothing to the next layer; only unit 1 separates the classes.
    # At β = 0 the softmax is softmax(c) and ∂L_S/∂β_j = (1/n) Σ_i z_ij (p − e_{y_i})ᵀ V_j.
    x = torch.zeros(6, 3, dtype=torch.float64)
    x[:, 2] = torch.tensor([1.0, 2, 3, 4, 5, 6])
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    z = torch.stack([torch.ones(6), 2.0 * y - 1, torch.ones(6)], 1).double()
    v = torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    c = torch.zeros(2, dtype=torch.float64)
    p = torch.softmax(c, 0)
    onehot = F.one_hot(y, 2).double()
    hand = (z * ((p - onehot) @ v)).sum(0) / 6
    assert hand.tolist() == pytest.approx([0.0, -1.0, 0.0])
    order = dcp_order(x, z, y, (v, c), torch.ones(3, dtype=torch.bool), weight=0.5)
    # step 1: |∇M| = (1, 0... ): unit 2 has |−1| from the reconstruction; unit 1 has 0.5·1
    assert order.tolist() == [2, 1, 0]
    # with λ = 2 the discriminative unit beats the reconstruction
    assert dcp_order(x, z, y, (v, c), torch.ones(3, dtype=torch.bool), weight=2.0)[0] == 1


def test_dcp_scores_follow_its_order_and_uniform_allocation_keeps_its_first_choices():
    with seeded(0):
        net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    method = make_method("dcp", refit=False)
    result = mipp.prune(net, (x, y), method=method, sparsity=0.5)
    scores = torch.tensor(result.report.groups[0].scores)
    assert sorted(scores.tolist()) == pytest.approx([1 - t / 6 for t in range(6)][::-1])
    assert result.report.groups[0].removed == sorted(scores.argsort()[:3].tolist())
    assert method.options()["weight"] == 1.0


def test_dcp_needs_labels_and_checks_its_weight():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(MippError, match="needs labels"):
        mipp.prune(net, torch.randn(8, 3), method="dcp", sparsity=0.5)
    with pytest.raises(ValueError, match="weight must be a number >= 0, got -1"):
        make_method("dcp", weight=-1)
