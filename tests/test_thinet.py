"""ThiNet: sampled contributions, greedy order, scores and the least-squares re-fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mipp
from helpers import make_ctx
from mipp.methods.baselines.thinet import (
    ThiNet,
    conv_contributions,
    conv_output_shape,
    greedy_order,
    greedy_scores,
    linear_contributions,
    scale_inputs,
)
from mipp.surgery.structure import Consumer

PAIRS = Consumer("c", ((0, 1), (2, 3), (4, 5)))  # units of two input channels / features each
SINGLE = Consumer("c", tuple((i,) for i in range(6)))

CONVS = {
    "stride-pad": lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1),
    "dilated-groups": lambda: nn.Conv2d(6, 4, (3, 2), padding=2, dilation=2, groups=2),
    "same-reflect": lambda: nn.Conv2d(6, 3, 3, padding="same", padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(6, 4, 3, stride=2, padding=1),
}


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("consumer", [SINGLE, PAIRS], ids=["single", "pairs"])
def test_conv_contributions_are_per_unit_outputs(kind, consumer):
    torch.manual_seed(0)
    conv = CONVS[kind]().double()
    x = torch.randn(3, 6, 7) if kind == "conv1d" else torch.randn(3, 6, 7, 6)
    x = x.double()
    outs, locs = conv_output_shape(conv, x)
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(3, (40,), generator=gen)
    out = torch.randint(outs, (40,), generator=gen)
    loc = torch.randint(locs, (40,), generator=gen)
    got = conv_contributions(conv, x, img, out, loc, consumer)
    assert got.shape == (40, len(consumer.index))
    for j, idx in enumerate(consumer.index):
        only = torch.zeros(6, dtype=torch.float64)
        only[list(idx)] = 1  # the conv's output (no bias) on unit j's channels alone
        shape = (1, 6, 1) if kind == "conv1d" else (1, 6, 1, 1)
        ref = conv._conv_forward(x * only.view(shape), conv.weight, None).flatten(2)
        torch.testing.assert_close(got[:, j], ref[img, out, loc])
    full = conv._conv_forward(x, conv.weight, None).flatten(2)
    torch.testing.assert_close(got.sum(1), full[img, out, loc])


@pytest.mark.parametrize("consumer", [SINGLE, PAIRS], ids=["single", "pairs"])
def test_linear_contributions_are_per_unit_outputs(consumer):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    img, out = torch.tensor([0, 1, 3, 3, 2]), torch.tensor([4, 0, 2, 1, 1])
    got = linear_contributions(lin, x, img, out, consumer)
    for j, idx in enumerate(consumer.index):
        cols = list(idx)
        ref = x[:, cols] @ lin.weight[:, cols].T
        torch.testing.assert_close(got[:, j], ref[img, out])


def test_greedy_order_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, 7)
    x[:, 4] = -0.9 * x[:, 1]  # x̂_4 nearly cancels x̂_1: the pair is cheap to remove together
    alive = torch.ones(7, dtype=torch.bool)
    alive[5] = False  # already removed: never ordered, scores 0
    order, errors = greedy_order(x, alive)
    # slow path: recompute ‖Σ_{T∪{j}} x̂‖² from scratch at every step
    removed: list[int] = []
    for step in range(6):
        cands = [j for j in range(7) if alive[j] and j not in removed]
        cost = {j: float(x[:, [*removed, j]].sum(1).square().sum()) for j in cands}
        best = min(cands, key=lambda j: (cost[j], j))
        assert int(order[step]) == best
        assert abs(float(errors[step]) - cost[best]) < 1e-9 * max(1.0, cost[best])
        removed.append(best)
    assert 5 not in order.tolist()
    scores = greedy_scores(x, alive)
    assert float(scores[5]) == 0.0
    ordered = scores[order]
    assert bool((ordered[1:] > ordered[:-1]).all())  # strictly increasing in greedy order
    rel = errors / float(x.sum(1).square().sum())
    torch.testing.assert_close(ordered, torch.cummax(rel, 0).values, atol=1e-8, rtol=0)
    # the last step removes every unit (the dead one contributes like the rest, not masked
    # here): its relative error is that of all live units
    total_live = float(x[:, alive].sum(1).square().sum()) / float(x.sum(1).square().sum())
    assert abs(float(rel[-1]) - total_live) < 1e-9


def small_convnet(tiny_channel: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 3),
    )
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # every channel of the first layer is active
        model[2].weight[:, tiny_channel] *= 1e-3
    return model.eval()


def test_thinet_removes_smallest_contribution_first():
    model = small_convnet(tiny_channel=1)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    ctx = make_ctx(model, x)
    scores = ThiNet().scores(ctx)["0"]
    assert int(torch.argmin(scores)) == 1
    result = mipp.prune(model, x, method="thinet", sparsity=0.25)  # 1 of 4 units per layer
    groups = {g.name: g for g in result.report.groups}
    assert groups["0"].removed == [1]
    assert abs(result.report.achieved["units"] - 0.25) <= 0.01


def redundant_net(consumer: str) -> nn.Sequential:
    """Producer channel 2 copies channel 0; the consumer reads it with 0.5 × channel 0's
    weights, and reads channel 1 strongly, so channel 2 is ThiNet's first pick."""
    torch.manual_seed(1)
    first = nn.Conv2d(1, 3, 3, padding=1)
    last = nn.Conv2d(3, 2, 3, padding=1) if consumer == "conv" else nn.Linear(3 * 25, 2)
    with torch.no_grad():
        first.weight[2] = first.weight[0]
        first.bias[2] = first.bias[0]
        first.bias[:] += 0.3
        if consumer == "conv":
            last.weight[:, 2] = 0.5 * last.weight[:, 0]
            last.weight[:, 1] *= 10
        else:  # flattened channel c owns features 25c .. 25c + 24
            last.weight[:, 50:75] = 0.5 * last.weight[:, 0:25]
            last.weight[:, 25:50] *= 10
    layers = (
        [first, nn.ReLU(), last] if consumer == "conv" else [first, nn.ReLU(), nn.Flatten(), last]
    )
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("consumer,rounds", [("conv", 1), ("linear", 1), ("conv", 2)])
def test_refit_restores_outputs_after_removing_a_redundant_channel(consumer, rounds):
    model = redundant_net(consumer)
    x = torch.randn(12, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    refit = mipp.prune(model, x, method=ThiNet(rounds=rounds), sparsity=1 / 3)
    plain = mipp.prune(model, x, method=ThiNet(refit=False, rounds=rounds), sparsity=1 / 3)
    for result in (refit, plain):
        assert result.report.groups[0].removed == [2]
    assert refit.report.options["refit"] is True and plain.report.options["refit"] is False
    with torch.no_grad():
        torch.testing.assert_close(refit.model(x), reference, atol=1e-5, rtol=0)
        assert float((plain.model(x) - reference).abs().max()) > 1e-2
        # ThiNet's scaling: channel 0's input weights grew by 1 + 0.5, channel 1's stayed
        last = [m for m in refit.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]
        orig = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]
        w0 = last.weight[:, 0] if consumer == "conv" else last.weight[:, :25]
        o0 = orig.weight[:, 0] if consumer == "conv" else orig.weight[:, :25]
        torch.testing.assert_close(w0, 1.5 * o0, atol=1e-5, rtol=1e-5)


def test_before_removal_called_directly_rescales_only_the_consumer():
    model = redundant_net("conv")
    x = torch.randn(8, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    ctx = make_ctx(model, x)
    method = ThiNet()
    scores = method.scores(ctx)["0"]
    assert int(torch.argmin(scores)) == 2
    removed = {"0": torch.tensor([False, False, True])}
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ctx.structure.mask({"0": [2]})
    method.before_removal(ctx, removed)
    after = ctx.model.state_dict()
    assert torch.equal(after["0.weight"][:2], before["0.weight"][:2])  # producer untouched
    torch.testing.assert_close(after["2.weight"][:, 0], 1.5 * before["2.weight"][:, 0])
    torch.testing.assert_close(after["2.weight"][:, 1], before["2.weight"][:, 1])
    assert torch.equal(after["2.bias"], before["2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(ctx.model(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make,x_shape",
    [
        (lambda: nn.Conv2d(6, 4, 3, groups=2), (2, 6, 5, 5)),
        (lambda: nn.Conv1d(6, 4, 3), (2, 6, 7)),
        (lambda: nn.Linear(6, 3), (2, 6)),
    ],
)
def test_scale_inputs_equals_scaling_the_unit_input(make, x_shape):
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    units, w = torch.tensor([0, 2]), torch.tensor([2.0, -0.5], dtype=torch.float64)
    factor = torch.ones(6, dtype=torch.float64)
    factor[[0, 1]], factor[[4, 5]] = 2.0, -0.5
    expected = module(x * factor.view(1, 6, *([1] * (x.ndim - 2))))
    scale_inputs(module, PAIRS, units, w)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected)


def test_sample_positions_are_seeded_and_replayed():
    model = small_convnet(tiny_channel=0)
    x = torch.randn(10, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    method = ThiNet(samples_per_image=3, images=7)
    ctx = make_ctx(model, x, batch_size=3)
    first = method.contributions(ctx, ctx.groups)
    again = method.contributions(ctx, ctx.groups)  # replays the cached positions
    fresh = method.contributions(make_ctx(model, x, batch_size=3), ctx.groups)  # same seed
    for name in first:
        for (la, a), (lb, b), (lc, c) in zip(first[name], again[name], fresh[name], strict=True):
            assert la == lb == lc and a.shape[0] == 7 * 3
            assert torch.equal(a, b) and torch.equal(a, c)
    # row sums are the consumer's sampled outputs minus bias, e.g. those of the Linear "5"
    ((layer, rows),) = first["2"]
    out = torch.cat([o for o, _ in ctx.cache["thinet"]["positions"][layer]])
    with torch.no_grad():
        y = model[:5](x[:7]) @ model[5].weight.T
    torch.testing.assert_close(rows.sum(1).float(), y[torch.arange(7).repeat_interleave(3), out])


def test_uniform_allocation_follows_greedy_order_at_every_count():
    model = small_convnet(tiny_channel=2)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    ctx = make_ctx(model, x)
    method = ThiNet()
    rows = method.contributions(ctx, ctx.groups)
    order, _ = greedy_order(torch.cat([r for _, r in rows["0"]]), ctx.alive["0"])
    for k in (1, 2, 3):
        result = mipp.prune(
            model, x, method=mipp.make_method("thinet", allocation="uniform"), sparsity=k / 4
        )
        removed = {g.name: g.removed for g in result.report.groups}["0"]
        assert removed == sorted(order[:k].tolist())
