"""Gradient-based baselines (SNIP, GraSP, SynFlow, iterative variants, SOSP-H) against
hand-computed gradients, finite differences, closed forms and explicit second-order maths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

import mipp
from helpers import make_ctx
from mipp.errors import MippError
from mipp.methods import make_method
from mipp.methods.baselines.gradient import (
    SNIP,
    SOSPH,
    GraSP,
    IterativeGraSP,
    IterativeSNIP,
    SynFlow,
    gauss_newton_product,
    hessian_vector_product,
    layer_parameters,
    loss_gradient,
)
from mipp.zoo.training import seeded

# torch compiles its forward-mode decompositions with torch.jit.script on first use (SOSP-H's
# Gauss–Newton product): a torch-internal deprecation notice, not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

ALL = (SNIP, GraSP, SynFlow, IterativeSNIP, IterativeGraSP, SOSPH)


def _mlp(
    act: type[nn.Module] = nn.ReLU,
    *,
    seed: int = 0,
    d_in: int = 3,
    hidden: int = 4,
    classes: int = 3,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    with seeded(seed):
        net = nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, classes))
    return net.to(dtype)


def _data(
    n: int = 8,
    d_in: int = 3,
    classes: int = 3,
    *,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _finite_difference_hvp(model, batches, params, v, *, temperature, eps=1e-4):
    """(∇L(θ + ε v̂) − ∇L(θ − ε v̂)) / 2ε · ‖v‖ on deep copies, v̂ = v / ‖v‖."""
    norm = torch.sqrt(sum((t**2).sum() for t in v))
    grads = []
    for sign in (1.0, -1.0):
        net = copy.deepcopy(model)
        shifted = layer_parameters(net)
        with torch.no_grad():
            for p, t in zip(shifted, v, strict=True):
                p += sign * eps * t / norm
        grads.append(loss_gradient(net, batches, shifted, temperature=temperature))
    return [(a - b) / (2 * eps) * norm for a, b in zip(*grads, strict=True)]


# ------------------------------------------------------------------------------- SNIP


def test_snip_matches_hand_computed_gradient():
    model = _mlp(nn.ReLU)
    x, y = _data(8)
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    w2, b2 = model[2].weight.detach(), model[2].bias.detach()
    h = x @ w1.T + b1
    a = h.clamp_min(0)
    p = torch.softmax(a @ w2.T + b2, dim=1)
    dz = (p - F.one_hot(y, 3).double()) / len(x)  # ∂(mean CE)/∂logits
    dh = (dz @ w2) * (h > 0).double()
    dw1, db1 = dh.T @ x, dh.sum(0)
    expected = (dw1 * w1).abs().sum(1) + (db1 * b1).abs()

    scores = {bs: SNIP().scores(make_ctx(model, x, y, batch_size=bs)) for bs in (2, 8)}
    assert set(scores[8]) == {"0"}
    assert scores[8]["0"].dtype == torch.float64
    torch.testing.assert_close(scores[8]["0"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(scores[2]["0"], scores[8]["0"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [GraSP, SOSPH])
def test_chunking_does_not_change_scores(cls):
    model = _mlp(nn.Tanh)
    x, y = _data(10)
    a = cls().scores(make_ctx(model, x, y, batch_size=3))["0"]  # chunks 3, 3, 3, 1
    b = cls().scores(make_ctx(model, x, y, batch_size=10))["0"]
    assert bool((a > 0).all())
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------ GraSP


def test_hessian_vector_product_matches_finite_differences():
    model = _mlp(nn.Tanh).eval()
    x, y = _data(10)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    params = layer_parameters(model)
    gen = torch.Generator().manual_seed(2)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    hv = hessian_vector_product(model, batches, params, v, temperature=1.0)
    fd = _finite_difference_hvp(model, batches, params, v, temperature=1.0)
    for got, want in zip(hv, fd, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in params)


def test_grasp_is_l1_of_w_times_finite_difference_hg_at_temperature_200():
    model = _mlp(nn.Tanh)
    x, y = _data(10)
    ctx = make_ctx(model, x, y, batch_size=4)
    scores = GraSP().scores(ctx)["0"]
    net = ctx.model
    batches = list(ctx.batches())
    params = layer_parameters(net)
    g = loss_gradient(net, batches, params, temperature=200.0)
    hg = _finite_difference_hvp(net, batches, params, g, temperature=200.0)
    w1, b1 = net[0].weight.detach(), net[0].bias.detach()
    expected = (w1 * hg[0]).abs().sum(1) + (b1 * hg[1]).abs()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)
    # temperature matters: T = 1 ranks by a different curvature
    assert not torch.allclose(GraSP(temperature=1.0).scores(ctx)["0"], scores, rtol=1e-2)


# ---------------------------------------------------------------------------- SynFlow


def test_synflow_matches_closed_form_of_two_layer_linear_net():
    with seeded(3):
        model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ctx = make_ctx(model, x, None)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    scores = SynFlow().scores(ctx)
    w1, w2 = model[0].weight.double(), model[1].weight.double()
    expected = w1.abs().sum(1) * w2.abs().sum(0)  # Σ_k |W1[j,k]| · Σ_i |W2[i,j]|
    torch.testing.assert_close(scores["0"], expected, rtol=1e-6, atol=0)
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # signs, dtype untouched
    assert ctx.model[0].weight.dtype == torch.float32


def test_synflow_ignores_signs_of_weights_and_batchnorm_buffers():
    with seeded(4):
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
        )
    model[1].running_mean.copy_(torch.tensor([-0.5, 0.2, -1.0]))
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for t in flipped.state_dict().values():
            if t.is_floating_point():
                t.neg_()
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = SynFlow().scores(make_ctx(model, x, None))
    b = SynFlow().scores(make_ctx(flipped, x, None))
    assert set(a) == {"0"} and bool((a["0"] > 0).all())
    torch.testing.assert_close(a["0"], b["0"], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- SOSP-H


def _explicit_sosp(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Full GN matrix and gradient over the flat Conv/Linear parameter vector θ."""
    names = ["0.weight", "0.bias", "3.weight", "3.bias"]  # Linear, BN (excluded), Tanh, Linear
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    theta = torch.cat([params[k].detach().flatten() for k in names])

    def unflatten(flat):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def logits(flat):
        return functional_call(model, unflatten(flat), (x,))

    jac = jacobian(logits, theta)  # (n, C, P)
    p = torch.softmax(logits(theta), dim=1)
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
    gn = torch.einsum("ncp,ncd,ndq->pq", jac, curv, jac) / len(x)
    grad = jacobian(lambda f: F.cross_entropy(logits(f), y), theta)
    return theta, gn, grad, unflatten


def test_sosp_h_matches_explicit_second_order_saliency():
    with seeded(5):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double()
    model[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
    model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, 0.7, -1.0, 2.0]))
    x, y = _data(10)
    ctx = make_ctx(model, x, y, batch_size=4)
    scores = SOSPH().scores(ctx)["0"]

    theta, gn, grad, unflatten = _explicit_sosp(ctx.model, x, y)
    h_theta = gn @ theta
    per = unflatten(theta * (0.5 * h_theta - grad))
    expected = (per["0.weight"].sum(1) + per["0.bias"]).abs()  # unit j: W1 row j and b1[j]
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)

    # the Gauss–Newton product itself, along θ and along a random vector
    params = layer_parameters(ctx.model)
    assert len(params) == 4  # BatchNorm scale and shift are not part of θ
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(6), dtype=theta.dtype)
    for vec in (theta, v):
        parts = unflatten(vec)
        got = gauss_newton_product(ctx.model, list(ctx.batches()), params, list(parts.values()))
        torch.testing.assert_close(
            torch.cat([t.flatten() for t in got]), gn @ vec, rtol=1e-6, atol=1e-12
        )


def test_gauss_newton_product_rejects_foreign_tensors():
    model = _mlp()
    x, y = _data(4)
    with pytest.raises(MippError, match=r"\(4, 3\)"):
        gauss_newton_product(model, [(x, y)], [torch.zeros(4, 3)], [torch.zeros(4, 3)])


# ------------------------------------------------------------------- shared behaviour


def test_defaults_names_and_options():
    assert [c().rounds for c in ALL] == [1, 1, 100, 10, 10, 1]
    assert [c.name for c in ALL] == [
        "snip",
        "grasp",
        "synflow",
        "iterative-snip",
        "iterative-grasp",
        "sosp-h",
    ]
    assert all(c.default_allocation == "global" for c in ALL)
    assert [c.needs_labels for c in ALL] == [True, True, False, True, True, True]
    assert [c.l1_aggregated for c in ALL] == [True, True, True, True, True, False]
    assert make_method("iterative-grasp", temperature=50).options() == {
        "allocation": "global",
        "rounds": 10,
        "normalize": "mean",
        "temperature": 50.0,
        "cost_aware": False,
    }
    for bad in (0, -1.0, float("inf"), "hot", True):
        with pytest.raises(ValueError, match=repr(bad)):
            GraSP(temperature=bad)
    with pytest.raises(ValueError, match="rounds"):
        SynFlow(rounds=0)


@pytest.mark.parametrize("cls", ALL)
def test_masked_unit_scores_zero_and_shapes(cls):
    model = _mlp(nn.Tanh, hidden=5)
    x, y = _data(8)
    ctx = make_ctx(model, x, y)
    ctx.structure.mask({"0": [1]})
    scores = cls().scores(ctx)
    assert set(scores) == {"0"}
    s = scores["0"]
    assert s.shape == (5,) and s.dtype == torch.float64 and s.device.type == "cpu"
    assert float(s[1]) == 0.0
    assert bool((s[[0, 2, 3, 4]] > 0).all())


@pytest.mark.parametrize("cls", ALL)
def test_scoring_leaves_the_model_as_it_was(cls):
    model = _mlp(nn.Tanh, dtype=torch.float32)
    x, y = _data(8, dtype=torch.float32)
    ctx = make_ctx(model, x, y)
    ctx.model.train()
    ctx.model[2].eval()
    ctx.model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    scores = cls().scores(ctx)
    assert scores["0"].dtype == torch.float64
    assert ctx.model.training and not ctx.model[2].training and ctx.model[0].training
    assert [p.requires_grad for p in ctx.model.parameters()] == [True, True, True, False]
    assert all(p.grad is None for p in ctx.model.parameters())
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in before.items())


def test_scores_use_eval_mode_batchnorm():
    """A train-mode BatchNorm would use batch statistics: scores must not depend on mode."""
    with seeded(7):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model = model.double()
    model[1].running_mean.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    x, y = _data(8)
    ctx = make_ctx(model, x, y)
    methods = (SNIP(), GraSP(), SOSPH())
    in_eval = [m.scores(ctx)["0"] for m in methods]
    ctx.model.train()
    for m, want in zip(methods, in_eval, strict=True):
        torch.testing.assert_close(m.scores(ctx)["0"], want, rtol=0, atol=0)
    assert ctx.model.training


@pytest.mark.parametrize("name", ["snip", "grasp", "iterative-snip", "iterative-grasp", "sosp-h"])
def test_missing_labels_raise_naming_the_method(name):
    model = _mlp(hidden=8)
    x, _ = _data(16)
    with pytest.raises(MippError, match=f"'{name}'"):
        mipp.prune(model, x, method=name, sparsity=0.5)


def test_synflow_needs_no_labels():
    model = _mlp(hidden=8)
    x, _ = _data(16)
    result = mipp.prune(model, x, method=SynFlow(rounds=2), sparsity=0.5)
    assert result.report.achieved["units"] == pytest.approx(0.5)
    assert result.model[0].out_features == 4


@pytest.mark.parametrize(
    "method",
    [
        SNIP(),
        GraSP(),
        SynFlow(rounds=3),
        IterativeSNIP(rounds=3),
        IterativeGraSP(rounds=2),
        SOSPH(),
    ],
    ids=lambda m: m.name,
)
def test_end_to_end_on_lenet5(method):
    with seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = mipp.prune(net, (x, y), method=method, sparsity=0.5)
    report = result.report
    assert report.method == method.name
    assert abs(report.achieved["units"] - 0.5) <= 0.01
    assert len(report.bisection) == method.rounds
    assert sum(g.width_after for g in report.groups) == report.units_after
    assert result.model(x[:2]).shape == (2, 10)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
