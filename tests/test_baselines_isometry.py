"""Signal-propagation pruning at initialisation (sp-pai): orthogonal layers before scoring,
data-free SNIP against a hand computation on the same Gaussian inputs, and exactly
isometric kept layers after pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mipp
from helpers import DepthwiseNet, GroupedNet, TinyResNet, make_ctx
from mipp.errors import MippError
from mipp.inputs import Samples
from mipp.methods import Budget, make_method
from mipp.methods.baselines.gradient import layer_parameters, loss_gradient
from mipp.methods.baselines.isometry import (
    SignalPropagation,
    gaussian_inputs,
    isometrise,
    orthogonal_init,
    polar_factor,
    uniform_loss_gradient,
)
from mipp.zoo.training import seeded


def _mlp(seed: int = 0, d_in: int = 3, hidden: int = 6, classes: int = 3) -> nn.Sequential:
    with seeded(seed):
        net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    return net.double()


def _blocks(module: nn.Module) -> list[torch.Tensor]:
    """A Conv/Linear layer's matrices: ``(out/groups, in/groups · k)`` per group block."""
    w = module.weight.detach().double()
    blocks = getattr(module, "groups", 1)
    return list(w.reshape(w.shape[0], -1).chunk(blocks, dim=0))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _assert_isometric(m: torch.Tensor, gain: float) -> None:
    """M Mᵀ = gain² I (M wide) or Mᵀ M = gain² I (M tall): all singular values = gain."""
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    eye = torch.eye(small.shape[0], dtype=small.dtype)
    torch.testing.assert_close(small, gain**2 * eye, rtol=0, atol=1e-5 * gain**2)


# -------------------------------------------------------------------- re-initialisation


@pytest.mark.parametrize("net", [TinyResNet, DepthwiseNet, GroupedNet])
def test_reinit_makes_every_layer_block_orthogonal_with_zero_biases_and_fresh_norms(net):
    with seeded(0):
        model = net()
    for m in model.modules():  # a "trained" state the reset must undo
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
            nn.init.constant_(m.weight, 0.5)
            nn.init.constant_(m.bias, -0.1)
    orthogonal_init(model, gain=2.0, generator=torch.Generator().manual_seed(0))
    for layer in _layers(model):
        for block in _blocks(layer):
            _assert_isometric(block, 2.0)
        if layer.bias is not None:
            assert bool((layer.bias == 0).all())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for m in norms:
        assert bool((m.running_mean == 0).all() and (m.running_var == 1).all())
        assert bool((m.weight == 1).all() and (m.bias == 0).all())


def test_reinit_is_seeded_and_does_not_depend_on_the_dtype():
    a, b, c = _mlp(), _mlp().float(), _mlp()
    orthogonal_init(a, generator=torch.Generator().manual_seed(3))
    orthogonal_init(b, generator=torch.Generator().manual_seed(3))
    orthogonal_init(c, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a[0].weight.float(), b[0].weight, rtol=0, atol=0)
    assert not torch.allclose(a[0].weight, c[0].weight)


# ----------------------------------------------------------------- data-free scores


def test_scores_equal_hand_computed_snip_on_the_gaussian_inputs_with_a_uniform_target():
    model = _mlp()
    n = 10
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    # the method's recipe: orthogonal layers from seed, standard normals from seed + 1
    net = copy.deepcopy(model)
    orthogonal_init(net, generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(1)).double()
    w1, b1 = net[0].weight.detach(), net[0].bias.detach()
    w2, b2 = net[2].weight.detach(), net[2].bias.detach()
    h = z @ w1.T + b1
    p = torch.softmax(h.clamp_min(0) @ w2.T + b2, dim=1)
    dz = (p - 1 / 3) / n  # ∂L/∂logits, L = (1/n) Σ CE(f(z_i), uniform)
    dh = (dz @ w2) * (h > 0).double()
    expected = ((dh.T @ z) * w1).abs().sum(1) + (dh.sum(0) * b1).abs()
    assert bool((b1 == 0).all()) and bool((expected > 0).all())

    for batch_size in (3, 10):  # chunking does not change the scores
        ctx = make_ctx(model, x, None, batch_size=batch_size)
        decision = SignalPropagation().decide(ctx, Budget(sparsity=0.5))
        got = torch.tensor(decision.groups["0"]["scores"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_uniform_target_gradient_is_snips_gradient_averaged_over_every_label():
    """CE is linear in its target: L is SNIP's loss averaged over the C labels, so its
    gradient is the mean of SNIP's gradients with every sample labelled c, c = 1..C."""
    model = _mlp().eval()
    params = layer_parameters(model)
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = uniform_loss_gradient(model, [Samples(z[:4]), Samples(z[4:])], params)
    per_label = [loss_gradient(model, [(z, torch.full((7,), c))], params) for c in range(3)]
    for i, g in enumerate(got):
        want = sum(grads[i] for grads in per_label) / 3
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in params)
    with pytest.raises(MippError, match=r"classes >= 2.*\(7, 1\)"):
        uniform_loss_gradient(nn.Linear(3, 1).double(), [Samples(z)], [])


def test_scores_do_not_depend_on_the_calibration_values_or_labels():
    model = _mlp()
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    x2 = 100 * torch.rand(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    scores = []
    for x, labels in ((x1, None), (x2, None), (x2, y)):
        decision = SignalPropagation().decide(make_ctx(model, x, labels), Budget(sparsity=0.5))
        scores.append(decision.groups["0"]["scores"])
    assert scores[0] == scores[1] == scores[2]


def test_gaussian_inputs_are_the_same_numbers_for_one_tensor_or_several():
    flat = Samples(torch.zeros(6, 8))
    split = Samples({"a": torch.zeros(6, 4), "b": torch.zeros(6, 2, 2, dtype=torch.float64)})
    one = gaussian_inputs(flat, torch.Generator().manual_seed(0)).value
    two = gaussian_inputs(split, torch.Generator().manual_seed(0)).value
    assert two["b"].dtype == torch.float64 and two["b"].shape == (6, 2, 2)
    torch.testing.assert_close(torch.cat([two["a"], two["b"].flatten(1).float()], 1), one)
    assert abs(float(one.mean())) < 0.5 and 0.5 < float(one.std()) < 1.5


def test_token_ids_are_refused_in_one_line_naming_the_input_kind():
    with seeded(0):
        net = nn.Sequential(
            nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3)
        )
    ids = torch.randint(0, 10, (16, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MippError, match="floating-point inputs") as e:
        mipp.prune(net, ids, method="sp-pai", sparsity=0.5)
    assert "'sp-pai'" in str(e.value) and "int64" in str(e.value) and "(5,)" in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- isometry


def test_polar_factor_is_the_closest_matrix_with_unit_singular_values():
    m = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = polar_factor(m)
    _assert_isometric(q, 1.0)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    # ‖m − q‖² = Σ (s − 1)², the least any matrix with unit singular values attains
    torch.testing.assert_close((m - q).square().sum(), (s - 1).square().sum())
    other = polar_factor(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).double())
    assert float((m - other).square().sum()) > float((s - 1).square().sum())
    torch.testing.assert_close(q, u @ vh)


def test_isometrise_replaces_exactly_the_kept_block_of_each_layer():
    model = _mlp(hidden=5)
    ctx = make_ctx(model, torch.randn(4, 3, dtype=torch.float64))
    (group,) = ctx.groups  # the hidden layer: rows of layer 0, columns of layer 2
    before = [m.weight.detach().clone() for m in (ctx.model[0], ctx.model[2])]
    gone = torch.tensor([False, True, False, False, True])
    isometrise(ctx.model, ctx.groups, {group.name: gone}, gain=3.0)
    w0, w2 = ctx.model[0].weight.detach(), ctx.model[2].weight.detach()
    keep = ~gone
    torch.testing.assert_close(w0[keep], 3.0 * polar_factor(before[0][keep]))
    torch.testing.assert_close(w2[:, keep], 3.0 * polar_factor(before[1][:, keep]))
    assert torch.equal(w0[gone], before[0][gone]) and torch.equal(w2[:, gone], before[1][:, gone])
    _assert_isometric(w0[keep], 3.0)
    _assert_isometric(w2[:, keep], 3.0)


@pytest.mark.parametrize("net", [TinyResNet, DepthwiseNet, GroupedNet])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_every_layer_of_the_pruned_model_is_isometric(net, gain):
    with seeded(0):
        model = net().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    method = make_method("sp-pai", gain=gain)
    result = mipp.prune(model, x, method=method, sparsity=0.5, scope="all")
    assert result.report.achieved["units"] > 0.3
    assert any(g.removed for g in result.report.groups)
    for layer in _layers(result.model):
        for block in _blocks(layer):
            _assert_isometric(block, gain)


def test_without_isometry_the_pruned_layers_are_not_isometric():
    with seeded(0):
        model = TinyResNet().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = mipp.prune(model, x, method=SignalPropagation(isometry=False), sparsity=0.5)
    before = {n: m.weight.shape for n, m in model.named_modules() if m in _layers(model)}
    pruned = [
        m for n, m in result.model.named_modules() if n in before and m.weight.shape != before[n]
    ]
    assert pruned
    svals = [torch.linalg.svdvals(b) for m in pruned for b in _blocks(m)]
    assert any(float(s.max() - s.min()) > 1e-3 for s in svals)


# ------------------------------------------------------------------ options, seeding


def test_reinit_false_scores_the_given_weights_and_leaves_them_unchanged():
    model = _mlp()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ctx = make_ctx(model, x)
    SignalPropagation(reinit=False, isometry=False).decide(ctx, Budget(sparsity=0.0))
    for name, t in model.state_dict().items():
        assert torch.equal(ctx.model.state_dict()[name], t), name
    # and with reinit, they change
    ctx = make_ctx(model, x)
    SignalPropagation(isometry=False).decide(ctx, Budget(sparsity=0.0))
    assert not torch.equal(ctx.model[0].weight, model[0].weight)


def test_reinit_false_scores_equal_those_of_the_reinitialised_copy_given_as_is():
    model = _mlp()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net = copy.deepcopy(model)
    orthogonal_init(net, generator=torch.Generator().manual_seed(0))
    a = SignalPropagation().decide(make_ctx(model, x), Budget(sparsity=0.5))
    b = SignalPropagation(reinit=False).decide(make_ctx(net, x), Budget(sparsity=0.5))
    assert a.groups["0"]["scores"] == b.groups["0"]["scores"]
    c = SignalPropagation(reinit=False).decide(make_ctx(model, x), Budget(sparsity=0.5))
    assert a.groups["0"]["scores"] != c.groups["0"]["scores"]


def test_pruning_is_seeded():
    with seeded(0):
        model = TinyResNet().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = [mipp.prune(model, x, method="sp-pai", sparsity=0.5, seed=s) for s in (0, 0, 1)]
    assert runs[0].report.removed == runs[1].report.removed
    again = runs[1].model.state_dict()
    for k, a in runs[0].model.state_dict().items():
        assert torch.equal(a, again[k]), k
    other = runs[2].model.state_dict()
    assert any(
        a.shape != other[k].shape or not torch.equal(a, other[k])
        for k, a in runs[0].model.state_dict().items()
    )


def test_options_are_recorded_and_checked():
    method = make_method("sp-pai", gain=2, reinit=False)
    assert method.options() == {
        "rounds": 1,
        "normalize": "mean",
        "allocation": "global",
        "cost_aware": False,
        "reinit": False,
        "isometry": True,
        "gain": 2.0,
    }
    assert SignalPropagation.needs_labels is False
    assert SignalPropagation.summary.endswith("(Lee et al. 2020)")
    for options, needle in (
        ({"gain": 0}, "gain must be a finite number > 0, got 0"),
        ({"gain": float("nan")}, "gain must be a finite number > 0"),
        ({"reinit": 1}, "reinit must be True or False, got 1"),
        ({"isometry": "yes"}, "isometry must be True or False, got 'yes'"),
    ):
        with pytest.raises(ValueError, match=needle):
            SignalPropagation(**options)
