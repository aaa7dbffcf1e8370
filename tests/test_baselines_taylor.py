"""Taylor (activation and weight) and Network Slimming: known answers on hand-built networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mipp
from helpers import make_ctx
from mipp.errors import MippError
from mipp.methods import make_method
from mipp.methods.allocation import normalise
from mipp.methods.baselines.taylor import (
    NetworkSlimming,
    TaylorActivation,
    TaylorWeight,
    gamma_l1_penalty,
)
from mipp.zoo.training import seeded


def _mlp(seed: int = 0) -> nn.Sequential:
    with seeded(seed):
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _hand(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """Pre-activation h, activation a, ∂C_i/∂a_i (per example) and ∂(mean CE)/∂h."""
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    w2, b2 = model[2].weight.detach(), model[2].bias.detach()
    h = x @ w1.T + b1
    a = h.clamp_min(0)
    dz = torch.softmax(a @ w2.T + b2, dim=1) - F.one_hot(y, 3).double()  # ∂C_i/∂logits_i
    return h, a, dz @ w2, (dz @ w2) * (h > 0).double() / len(x)


def test_taylor_activation_is_the_mean_of_per_example_first_order_terms():
    model = _mlp()
    x, y = _data(8)
    _, a, da, _ = _hand(model, x, y)
    expected = (a * da).abs().mean(0)  # Θ_ij = |a_ij ∂C_i/∂a_ij| (one position per neuron)
    for bs in (3, 8):  # chunking does not change it
        got = TaylorActivation().scores(make_ctx(model, x, y, batch_size=bs))["0"]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    assert bool((expected > 0).any())


def test_taylor_activation_averages_a_conv_map_before_the_absolute_value():
    """Θ = |(1/M) Σ_m a_m ∂C/∂a_m|, not (1/M) Σ_m |…|: on a conv map the two differ."""
    with seeded(0):
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3)
        ).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1])
    a = torch.tanh(net[0](x)).detach().requires_grad_(True)
    loss = F.cross_entropy(net[3](a.flatten(1)), y, reduction="sum")
    (ga,) = torch.autograd.grad(loss, a)
    expected = (a.detach() * ga).mean((2, 3)).abs().mean(0)
    got = TaylorActivation().scores(make_ctx(net, x, y))["0"]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    assert not torch.allclose(got, (a.detach() * ga).abs().mean((2, 3)).mean(0))


def test_taylor_weight_is_the_squared_first_order_change_of_zeroing_the_unit():
    model = _mlp()
    x, y = _data(8)
    _, _, _, dh = _hand(model, x, y)
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    expected = ((dh.T @ x) * w1).sum(1).add(dh.sum(0) * b1).pow(2)  # (Σ g·w + g_b·b)²
    for bs in (3, 8):
        got = TaylorWeight().scores(make_ctx(model, x, y, batch_size=bs))["0"]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


def test_taylor_weight_first_order_term_predicts_the_loss_change_of_a_small_unit():
    """The signed first-order term Σ g·w is the derivative of the loss along the unit's own
    parameters: scaling unit j's weights by (1 − ε) changes the loss by −ε Σ g·w + O(ε²)."""
    model = _mlp()
    x, y = _data(8)
    _, _, _, dh = _hand(model, x, y)
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    first = ((dh.T @ x) * w1).sum(1) + dh.sum(0) * b1
    eps = 1e-6
    for j in range(4):
        net = _mlp()
        with torch.no_grad():
            net[0].weight[j] *= 1 - eps
            net[0].bias[j] *= 1 - eps
        change = F.cross_entropy(net(x), y) - F.cross_entropy(model(x), y)
        assert float(change.detach()) == pytest.approx(-eps * float(first[j]), rel=1e-4, abs=1e-13)


def test_l2_normalisation_divides_by_the_norm_of_the_live_scores():
    s = torch.tensor([3.0, 4.0, 100.0])
    alive = torch.tensor([True, True, False])
    torch.testing.assert_close(normalise(s, alive, "l2"), s.double() / 5.0)


# --- Network Slimming ----------------------------------------------------------------------


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_slimming_scores_are_the_batchnorm_scales():
    with seeded(0):
        net = _BNNet().eval()
    with torch.no_grad():
        net.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.01, 1.0]))
        net.bn2.weight.copy_(torch.tensor([-0.3, 0.2, 3.0]))
    x = torch.randn(8, 1, 6, 6)
    scores = NetworkSlimming().scores(make_ctx(net, x))
    torch.testing.assert_close(scores["conv1"], torch.tensor([0.5, 2.0, 0.01, 1.0]).double())
    torch.testing.assert_close(scores["conv2"], torch.tensor([0.3, 0.2, 3.0]).double())
    # raw |γ| ranked globally: at 3 of 7 units the three smallest scales go
    report = mipp.prune(net, x, method="slimming", sparsity=3 / 7).report
    kept = {g.name: g.kept for g in report.groups}
    assert kept == {"conv1": [0, 1, 3], "conv2": [2]}


def test_slimming_refuses_groups_without_a_normalisation_layer():
    model = _mlp().float()
    with pytest.raises(MippError, match=r"group\(s\) \['0'\] have none"):
        mipp.prune(model, torch.randn(8, 3), method="slimming", sparsity=0.5)


def test_gamma_penalty_gradient_matches_finite_differences():
    with seeded(0):
        net = _BNNet().double()
    with torch.no_grad():
        net.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.3, 1.0]))
    penalty = gamma_l1_penalty(1e-2)
    value = penalty(net)
    (grad,) = torch.autograd.grad(value, net.bn1.weight)
    torch.testing.assert_close(grad, 1e-2 * torch.sign(net.bn1.weight.detach()))
    eps = 1e-6
    for j in range(4):
        with torch.no_grad():
            net.bn1.weight[j] += eps
            up = float(penalty(net))
            net.bn1.weight[j] -= 2 * eps
            down = float(penalty(net))
            net.bn1.weight[j] += eps
        assert (up - down) / (2 * eps) == pytest.approx(float(grad[j]), rel=1e-6)
    assert float(value.detach()) == pytest.approx(
        1e-2 * (3.8 + float(net.bn2.weight.detach().abs().sum()))
    )


def test_slimming_training_shrinks_the_scales_and_counts_its_epochs():
    with seeded(0):
        net = _BNNet().eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6, generator=gen), torch.randint(0, 2, (64,), generator=gen)
    plain = make_method("slimming", epochs=2, penalty=0.0, lr=0.05)
    sparse = make_method("slimming", epochs=2, penalty=0.5, lr=0.05)
    assert sparse.extra_training_epochs() == 2 and NetworkSlimming().extra_training_epochs() == 0
    sums = []
    for method in (plain, sparse):
        ctx = make_ctx(net, x, y, batch_size=16)
        ctx.data = (x, y)
        scores = method.scores(ctx)
        sums.append(float(sum(s.sum() for s in scores.values())))
    assert sums[1] < sums[0]


# --- Optimal Brain Damage -------------------------------------------------------------------


def _ggn_reference(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag((1/n) Σ_i J_iᵀ H_i J_i) from full per-sample Jacobians (torch.func.jacrev)."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in net.named_parameters()}
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        jac = jacrev(lambda ps, i=i: functional_call(net, ps, (x[i : i + 1],)).squeeze(0))(params)
        p = torch.softmax(net(x[i : i + 1]).detach().squeeze(0), -1)
        h = torch.diag(p) - torch.outer(p, p)
        for k, j in jac.items():
            jf = j.reshape(len(p), -1)
            out[k] += torch.einsum("cw,cd,dw->w", jf, h, jf).reshape(out[k].shape) / len(x)
    return out


@pytest.mark.parametrize("kind", ["conv2d-grouped", "conv1d", "tokens"])
def test_gauss_newton_diagonal_is_exact(kind):
    from mipp.methods.baselines.curvature import ggn_diagonal

    gen = torch.Generator().manual_seed(3)
    with seeded(0):
        if kind == "conv2d-grouped":
            net = nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
            )  # fmt: skip
            x = torch.randn(6, 2, 5, 5, generator=gen)
        elif kind == "conv1d":
            net = nn.Sequential(
                nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.Tanh(), nn.Flatten(),
                nn.Linear(18, 4),
            )  # fmt: skip
            x = torch.randn(5, 2, 6, generator=gen)
        else:  # a Linear on (batch, tokens, features), pooled
            net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3), _MeanTokens())
            x = torch.randn(5, 4, 3, generator=gen)
    net = net.double().eval()
    x = x.double()
    want = _ggn_reference(net, x)
    got = ggn_diagonal(net, [(x[:3], None), (x[3:], None)])  # chunked
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[id(p)], want[name], rtol=1e-9, atol=1e-15)


class _MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def test_gauss_newton_diagonal_monte_carlo_fisher_converges_to_it():
    from mipp.methods.baselines.curvature import ggn_diagonal

    model = _mlp()
    x, _ = _data(6)
    exact = ggn_diagonal(model, [(x, None)])
    sampled = ggn_diagonal(model, [(x, None)], max_classes=1, draws=20000, seed=0)
    for p in model.parameters():
        torch.testing.assert_close(sampled[id(p)], exact[id(p)], rtol=0.05, atol=1e-4)


def test_obd_scores_half_the_diagonal_saliency_summed_over_the_unit():
    from mipp.methods.baselines.curvature import OBD

    model = _mlp()
    x, _ = _data(8)
    diag = _ggn_reference(model, x)
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    expected = 0.5 * (diag["0.weight"] * w1**2).sum(1) + 0.5 * diag["0.bias"] * b1**2
    got = OBD().scores(make_ctx(model, x, batch_size=3))["0"]  # no labels needed
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


# --- Channel Pruning (LASSO) ----------------------------------------------------------------


def test_lasso_entry_order_on_orthogonal_contributions_is_their_squared_norms():
    """Orthogonal columns: unit j enters the LASSO path at α = ‖x̂_j‖² / m, so the scores
    are the squared norms over the largest one; a dead unit scores 0."""
    from mipp.methods.baselines.thinet import lasso_scores

    x = torch.zeros(8, 4, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 1.0, 2.0, 3.0, 5.0
    alive = torch.tensor([True, True, True, False])
    scores = lasso_scores(x, alive)
    torch.testing.assert_close(scores, torch.tensor([1 / 9, 4 / 9, 1.0, 0.0], dtype=torch.float64))


def test_channel_pruning_drops_the_unit_the_next_layer_ignores_and_refits():
    """Unit 1 of a Linear producer is read with zero weights by the consumer: it enters the
    LASSO path last (never), so it goes first; the method's default repair re-fits."""
    with seeded(0):
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net[2].weight[:, 1] = 0
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    result = mipp.prune(net, x, method="channel-pruning", sparsity=0.25)
    (group,) = result.report.groups
    assert group.removed == [1]
    assert result.report.options["compensate"] is True
    scores = make_method("channel-pruning").scores(make_ctx(net, x))["0"]
    assert float(scores[1]) == 0.0 and bool((scores[[0, 2, 3]] > 0).all())


# --- Collaborative Channel Pruning ----------------------------------------------------------


def test_quadratic_greedy_follows_the_hand_computed_steps():
    """ΔL(S) = −Σ_S a + ½ Σ_{S×S} s: steps remove 0 (ΔL −0.5), then 2 (ΔL({0,2}) = −1.5 +
    ½(1 + 0.4) = −0.8), then 1 (−0.4); scores are the running maxima in that order."""
    from mipp.methods.baselines.taylor import quadratic_greedy_scores

    a = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 0.3], [0.0, 0.3, 0.4]], dtype=torch.float64)
    scores = quadratic_greedy_scores(a, s, torch.ones(3, dtype=torch.bool))
    assert scores.argsort().tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([-0.5, -0.4, -0.5]).double(), atol=1e-8, rtol=0)
    dead = quadratic_greedy_scores(a, s, torch.tensor([True, False, True]))
    assert float(dead[1]) < float(dead[[0, 2]].min())


def test_ccp_builds_its_quadratic_from_chunk_gradients():
    """a_i = mean_b t_bi and s_ij = mean_b t_bi t_bj, t_bi = Σ over unit i's parameters of
    g_b·w with g_b the gradient of chunk b's mean loss (two chunks of 4, by hand)."""
    from mipp.methods.baselines.taylor import CollaborativeChannelPruning, quadratic_greedy_scores

    model = _mlp()
    x, y = _data(8)
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    t = []
    for part in (slice(0, 4), slice(4, 8)):
        _, _, _, dh = _hand(model, x[part], y[part])
        t.append(((dh.T @ x[part]) * w1).sum(1) + dh.sum(0) * b1)
    t = torch.stack(t)
    want = quadratic_greedy_scores(t.mean(0), t.T @ t / 2, torch.ones(4, dtype=torch.bool))
    got = CollaborativeChannelPruning().scores(make_ctx(model, x, y, batch_size=4))["0"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# --- training-time regularisers: SSL and GReg ---------------------------------------------


def test_ssl_group_lasso_gradient_matches_finite_differences():
    from mipp.methods.baselines.regularised import StructuredSparsity

    model = _mlp()
    x, y = _data(8)
    ctx = make_ctx(model, x, y)
    penalty = StructuredSparsity(penalty=0.1).penalty(ctx, steps=1)
    net = ctx.model
    value = penalty(net)
    w, b = net[0].weight, net[0].bias
    rows = torch.cat([w.detach(), b.detach()[:, None]], 1)
    assert float(value.detach()) == pytest.approx(0.1 * float(rows.norm(dim=1).sum()), rel=1e-12)
    gw, gb = torch.autograd.grad(value, [w, b])
    norms = rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(gw, 0.1 * w.detach() / norms, rtol=1e-9, atol=0)
    torch.testing.assert_close(gb, 0.1 * b.detach() / norms[:, 0], rtol=1e-9, atol=0)
    eps = 1e-6
    with torch.no_grad():
        w[2, 1] += eps
        up = float(penalty(net))
        w[2, 1] -= 2 * eps
        down = float(penalty(net))
        w[2, 1] += eps
    assert (up - down) / (2 * eps) == pytest.approx(float(gw[2, 1]), rel=1e-6)


def test_ssl_scores_are_unit_norms_and_its_training_shrinks_them():
    from mipp.methods.baselines.regularised import StructuredSparsity

    model = _mlp()
    x, y = _data(32)
    rows = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    scores = StructuredSparsity(epochs=0).scores(make_ctx(model, x, y))["0"]
    torch.testing.assert_close(scores, rows.norm(dim=1), rtol=1e-12, atol=0)
    sums = []
    for weight in (0.0, 0.05):
        ctx = make_ctx(model, x, y)
        sums.append(float(StructuredSparsity(epochs=3, penalty=weight).scores(ctx)["0"].sum()))
    assert sums[1] < sums[0]


def test_greg_grows_its_penalty_on_the_l1_choice_and_removes_exactly_it():
    from mipp.methods.baselines.regularised import GrowingRegularization

    model = _mlp()
    x, y = _data(32)
    rows = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    l1_order = rows.abs().sum(1).argsort()[:2].sort().values.tolist()  # the 2 smallest
    method = GrowingRegularization(epochs=2, growth=0.01, ceiling=0.015)
    result = mipp.prune(model, (x, y), method=method, sparsity=0.5)
    assert result.report.groups[0].removed == l1_order
    assert method.extra_training_epochs() == 2
    # λ_t = min(ceiling, growth · t): 0, 0.01, 0.015, 0.015 ... times ½ Σ_chosen ‖W_j‖²
    ctx = make_ctx(model, x, y)
    method._chosen = {"0": torch.tensor([j in l1_order for j in range(4)])}
    penalty = method.penalty(ctx, steps=4)
    half = 0.5 * float((rows[l1_order] ** 2).sum())
    got = [float(penalty(ctx.model).detach()) for _ in range(4)]
    assert got == pytest.approx([0.0, 0.01 * half, 0.015 * half, 0.015 * half], rel=1e-12)


def test_increg_increments_follow_the_piecewise_linear_rule():
    from mipp.methods.baselines.regularised import increg_increments

    # N = 5 units, RN = 2 to prune, A = 0.1: ranks 0, 1 gain A(1 − r/2); ranks 2..4 lose
    # A(r − 1)/3
    got = increg_increments(torch.tensor([0.0, 1, 2, 3, 4]), 5, 2, 0.1)
    want = [0.1, 0.05, -0.1 / 3, -0.2 / 3, -0.1]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert (increg_increments(torch.arange(4.0), 4, 0, 0.1) <= 0).all()  # nothing to prune


def test_increg_factors_follow_the_l1_ranks_and_its_penalty_is_their_weighted_norms():
    from mipp.methods.baselines.regularised import IncrementalRegularization

    model = _mlp()
    x, y = _data(32)
    rows = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], 1)
    ranks = torch.empty(4, dtype=torch.float64)
    ranks[rows.abs().sum(1).argsort()] = torch.arange(4.0, dtype=torch.float64)
    method = IncrementalRegularization(step=0.1, ceiling=0.15)
    method._chosen = {"0": ranks < 2}  # RN = 2 of 4
    ctx = make_ctx(model, x, y)
    penalty = method.penalty(ctx, steps=3)
    inc = torch.where(ranks < 2, 0.1 * (1 - ranks / 2), -0.1 * (ranks - 1) / 2).double()
    sq = (rows**2).sum(1)
    for t in (1, 2):  # weights unchanged, so the ranks and increments repeat
        got = float(penalty(ctx.model).detach())
        lam = (t * inc).clamp(0, 0.15)
        torch.testing.assert_close(method.factors["0"], lam, rtol=1e-12, atol=0)
        assert got == pytest.approx(0.5 * float((lam * sq).sum()), rel=1e-12)
    # gradient of the penalty: λ_j W_j on unit j's parameters
    value = penalty(ctx.model)
    gw = torch.autograd.grad(value, [ctx.model[0].weight])[0]
    torch.testing.assert_close(gw, method.factors["0"][:, None] * ctx.model[0].weight.detach())


def test_increg_removes_the_units_with_the_largest_factors():
    from mipp.methods.baselines.regularised import IncrementalRegularization

    model = _mlp()
    x, y = _data(32)
    method = IncrementalRegularization(epochs=2, step=0.05)
    result = mipp.prune(model, (x, y), method=method, sparsity=0.5)
    lam = method.factors["0"]
    assert result.report.groups[0].removed == sorted(lam.argsort(descending=True)[:2].tolist())
    assert float(lam.max()) > 0 and method.extra_training_epochs() == 2
    assert method.options()["step"] == 0.05 and "growth" not in method.options()


# --- ProsPr ----------------------------------------------------------------------------------


def _unrolled_loss(model: nn.Sequential, c: torch.Tensor, chunks, steps: int, lr: float) -> float:
    """ProsPr's L_M written out by hand: unit masks c on layer 0's rows, plain SGD steps."""
    w1 = model[0].weight.detach() * c[:, None]
    b1 = model[0].bias.detach() * c
    w2, b2 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    params = [w.clone().requires_grad_(True) for w in (w1, b1, w2, b2)]
    for k in range(steps + 1):
        x, y = chunks[k % len(chunks)]
        logits = torch.relu(x @ params[0].T + params[1]) @ params[2].T + params[3]
        loss = F.cross_entropy(logits, y)
        if k == steps:
            return float(loss)
        grads = torch.autograd.grad(loss, params)
        params = [
            (p - lr * g).detach().requires_grad_(True) for p, g in zip(params, grads, strict=True)
        ]
    raise AssertionError


def test_prospr_meta_gradient_matches_finite_differences_of_the_unrolled_training():
    from mipp.methods.baselines.gradient import ProsPr

    model = _mlp()
    x, y = _data(12)
    chunks = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    got = ProsPr(steps=2, lr=0.5).scores(make_ctx(model, x, y, batch_size=4))["0"]
    eps = 1e-6
    for j in range(4):
        c = torch.ones(4, dtype=torch.float64)
        c[j] += eps
        up = _unrolled_loss(model, c, chunks, 2, 0.5)
        c[j] -= 2 * eps
        down = _unrolled_loss(model, c, chunks, 2, 0.5)
        assert float(got[j]) == pytest.approx(abs(up - down) / (2 * eps), rel=1e-5, abs=1e-10)
    assert bool((got > 0).any())


# --- K-FAC structured saliency (EigenDamage's Fisher) ----------------------------------------


def test_kfac_saliency_is_half_s_jj_times_the_kronecker_quadratic_form():
    """½ S_jj · w̃_jᵀ A w̃_j with A the mean outer product of the bias-augmented input patches
    and S_jj the expected squared output gradient under the model's own predictive
    distribution (from the Jacobian and the softmax Hessian); w̃ᵀAw̃ = E[z_j²]."""
    from torch.func import jacrev

    from mipp.methods.baselines.curvature import KFACOBD

    with seeded(0):
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
        ).double()
    net.eval()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = net[0](x).detach()
    head = nn.Sequential(net[1], net[2], net[3])
    s_jj = torch.zeros(3, dtype=torch.float64)
    for i in range(5):
        jac = jacrev(lambda zi: head(zi.unsqueeze(0)).squeeze(0))(z[i])  # (4, 3, 4, 4)
        p = torch.softmax(head(z[i : i + 1]).detach().squeeze(0), -1)
        h = torch.diag(p) - torch.outer(p, p)
        cols = jac.reshape(4, 3, 16)
        s_jj += torch.einsum("cjt,cd,djt->j", cols, h, cols) / 5
    patches = F.unfold(x, 3, padding=1)  # (5, 18, 16)
    aug = torch.cat([patches, torch.ones(5, 1, 16, dtype=torch.float64)], 1)
    a = torch.einsum("bpt,bqt->pq", aug, aug) / (5 * 16)
    w = torch.cat([net[0].weight.detach().reshape(3, -1), net[0].bias.detach()[:, None]], 1)
    quad = torch.einsum("jp,pq,jq->j", w, a, w)
    torch.testing.assert_close(quad, z.pow(2).mean((0, 2, 3)), rtol=1e-10, atol=0)
    got = KFACOBD().scores(make_ctx(net, x, batch_size=2))["0"]
    torch.testing.assert_close(got, 0.5 * s_jj * quad, rtol=1e-9, atol=0)


def test_tpp_penalty_counts_every_gram_entry_touching_a_pruned_filter_and_its_norm():
    from mipp.methods.baselines.regularised import TrainabilityPreserving, tpp_penalty_value

    with seeded(0):
        net = _BNNet().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    ctx = make_ctx(net, x)
    modules = ctx.modules
    (g,) = [h for h in ctx.groups if h.name == "conv1"]
    chosen = torch.tensor([True, False, False, True])
    w = ctx.model.conv1.weight.reshape(4, -1)
    gram = (w @ w.T).detach()
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[1:3, 1:3] = False  # kept × kept is free
    bn = ctx.model.bn1
    want = gram[outside].pow(2).sum() + (bn.weight[[0, 3]] ** 2 + bn.bias[[0, 3]] ** 2).sum()
    value = tpp_penalty_value(g, modules, chosen)
    assert float(value.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    (grad,) = torch.autograd.grad(value, ctx.model.conv1.weight)
    eps = 1e-6
    for idx in [(1, 0, 1, 1), (3, 0, 0, 2)]:  # a kept filter's weight, a pruned one's
        with torch.no_grad():
            ctx.model.conv1.weight[idx] += eps
            up = float(tpp_penalty_value(g, modules, chosen))
            ctx.model.conv1.weight[idx] -= 2 * eps
            down = float(tpp_penalty_value(g, modules, chosen))
            ctx.model.conv1.weight[idx] += eps
        assert (up - down) / (2 * eps) == pytest.approx(float(grad[idx]), rel=1e-6)
    method = TrainabilityPreserving(growth=0.5, ceiling=0.75)
    method._chosen = {"conv1": chosen, "conv2": torch.zeros(3, dtype=torch.bool)}
    penalty = method.penalty(ctx, steps=3)
    got = [float(penalty(ctx.model).detach()) for _ in range(3)]
    assert got == pytest.approx([0.0, 0.25 * float(value), 0.375 * float(value)], rel=1e-12)


# --- OTO -------------------------------------------------------------------------------------


def test_oto_groups_hold_filter_bias_and_batchnorm_and_their_lasso_is_exact():
    from mipp.methods.baselines.regularised import OnlyTrainOnce

    with seeded(0):
        net = _BNNet().double()
    ctx = make_ctx(net, torch.randn(4, 1, 6, 6, dtype=torch.float64))
    m = ctx.model
    norms = (
        m.conv1.weight.detach().reshape(4, -1).pow(2).sum(1)
        + m.conv1.bias.detach() ** 2
        + m.bn1.weight.detach() ** 2
        + m.bn1.bias.detach() ** 2
    ).sqrt()
    scores = OnlyTrainOnce(epochs=0, warmup=0).scores(ctx)
    torch.testing.assert_close(scores["conv1"], norms, rtol=1e-12, atol=0)
    value = OnlyTrainOnce(penalty=0.1).penalty(ctx, 0)(m)
    conv2 = scores["conv2"].sum()
    assert float(value.detach()) == pytest.approx(0.1 * float(norms.sum() + conv2), rel=1e-12)
    (grad,) = torch.autograd.grad(value, m.bn1.weight)
    torch.testing.assert_close(grad, 0.1 * m.bn1.weight.detach() / norms, rtol=1e-9, atol=0)


def test_oto_half_space_step_zeroes_groups_that_cross_and_keeps_them_zero():
    from mipp.methods.baselines.regularised import OnlyTrainOnce

    with seeded(0):
        net = _BNNet().double()
    ctx = make_ctx(net, torch.randn(4, 1, 6, 6, dtype=torch.float64))
    m = ctx.model
    project = OnlyTrainOnce(epsilon=0.5).half_space(ctx)  # snapshots the current values
    old = {k: v.detach().clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        # unit 0 of conv1: x̃ = 0.4 x (x̃ᵀx = 0.4‖x‖² < 0.5‖x‖²) → zeroed
        for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias):
            t[0] *= 0.4
        # unit 1: x̃ = 0.6 x → kept as stepped
        for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias):
            t[1] *= 0.6
        project(m)
    for t in (m.conv1.weight, m.conv1.bias, m.bn1.weight, m.bn1.bias):
        assert bool((t[0] == 0).all())
    torch.testing.assert_close(m.conv1.weight[1], 0.6 * old["conv1.weight"][1])
    torch.testing.assert_close(m.conv1.weight[2], old["conv1.weight"][2])
    with torch.no_grad():
        m.conv1.weight[0] += 1.0  # a step that moves a zero group: it is projected back
        project(m)
    assert bool((m.conv1.weight[0] == 0).all())


# --- OBS / WoodFisher ------------------------------------------------------------------------


def test_obs_saliency_and_update_match_the_explicit_fisher():
    """Against F = λI + (1/m) G Gᵀ formed explicitly: the unit's saliency
    ½ w_Qᵀ[(F⁻¹)_QQ]⁻¹w_Q, and the OBS update δθ = −F⁻¹[:,Q][(F⁻¹)_QQ]⁻¹w_Q zeroes the
    removed block exactly while raising the quadratic model ½ δθᵀFδθ by the saliency."""
    from mipp.methods.baselines.curvature import OBS, _block_rows, _WoodburyFisher

    model = _mlp()
    x, y = _data(6)
    layer = model[0]
    grads = []
    for i in range(6):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        grads.append(torch.cat([gw.reshape(-1), gb]))
    g = torch.stack(grads, 1)  # (16, 6)
    damp = 1e-3
    fisher = damp * torch.eye(16, dtype=torch.float64) + g @ g.T / 6
    inv = torch.linalg.inv(fisher)
    theta = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    wood = _WoodburyFisher(g, damp)
    want = []
    for j in range(4):
        q = _block_rows(layer, [j])
        w = theta[q]
        want.append(0.5 * w @ torch.linalg.solve(inv[q][:, q], w))
        torch.testing.assert_close(wood.solve_qq(q, w), torch.linalg.solve(inv[q][:, q], w))
    got = OBS(damp=damp, samples=6).scores(make_ctx(model, x, y, batch_size=4))["0"]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-8, atol=0)
    q = _block_rows(layer, [1, 3])
    v = wood.solve_qq(q, theta[q])
    delta = -wood.inverse_times(q, v)
    torch.testing.assert_close(delta, -inv[:, q] @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        (theta + delta)[q], torch.zeros(len(q), dtype=torch.float64), atol=1e-9, rtol=0
    )
    joint = 0.5 * theta[q] @ torch.linalg.solve(inv[q][:, q], theta[q])
    assert float(0.5 * delta @ fisher @ delta) == pytest.approx(float(joint), rel=1e-8)


def test_obs_applies_its_update_to_the_kept_units():
    model = _mlp()
    x, y = _data(16)
    kept_before = model[0].weight.detach().clone()
    result = mipp.prune(model, (x, y), method="obs", sparsity=0.5)
    (group,) = result.report.groups
    after = result.model[0].weight.detach()
    assert not torch.allclose(after, kept_before[group.kept])  # the OBS update moved them
    plain = mipp.prune(model, (x, y), method=make_method("obs", update=False), sparsity=0.5)
    torch.testing.assert_close(plain.model[0].weight.detach(), kept_before[group.kept])
