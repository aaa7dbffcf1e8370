"""HRank, CHIP, mean activation and APoZ on hand-made maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mipp
from helpers import make_ctx
from mipp.methods.baselines.activation import (
    CHIP,
    APoZ,
    HRank,
    MeanActivation,
    channel_independence,
)
from mipp.methods.baselines.thinet import ThiNet


def identity_net(channels: int, *, relu: bool = False) -> nn.Sequential:
    """1×1 identity conv (the only pruned group) → [ReLU] → 1×1 output conv.

    The output conv reads the identity conv's output, so each unit's map is its input channel.
    """
    first = nn.Conv2d(channels, channels, 1, bias=False)
    last = nn.Conv2d(channels, 2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
    layers = [first, nn.ReLU(), last] if relu else [first, last]
    return nn.Sequential(*layers).eval()


def outer(gen: torch.Generator, rank: int, side: int = 6) -> torch.Tensor:
    """A (side, side) integer matrix, the sum of ``rank`` outer products of integer vectors."""
    u = torch.randint(-3, 4, (side, rank), generator=gen).float()
    v = torch.randint(-3, 4, (rank, side), generator=gen).float()
    return u @ v


def test_hrank_scores_are_exact_mean_ranks():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 4, 6, 6)
    for i in range(4):
        x[i, 0] = outer(gen, 1)
        x[i, 1] = outer(gen, 2 if i < 2 else 3)
        x[i, 2] = torch.triu(torch.randint(1, 4, (6, 6), generator=gen).float())  # full rank
        # channel 3 stays zero: rank 0
    for i in range(4):  # the constructed ranks are what we claim
        ranks = torch.linalg.matrix_rank(x[i].double()).tolist()
        assert ranks == [1, 2 if i < 2 else 3, 6, 0]
    ctx = make_ctx(identity_net(4), x, batch_size=3)
    (name,) = [g.name for g in ctx.groups]
    scores = HRank().scores(ctx)[name]
    assert scores.dtype == torch.float64
    assert scores.tolist() == [1.0, 2.5, 6.0, 0.0]
    # samples: only the first two images count
    assert HRank(samples=2).scores(ctx)[name].tolist() == [1.0, 2.0, 6.0, 0.0]


def test_hrank_neuron_maps_have_rank_zero_or_one():
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.tensor([[1.0, -1.0, 2.0], [2.0, -2.0, 1.0], [-1.0, -1.0, 3.0], [3.0, 0.0, 1.0]])
    ctx = make_ctx(model, x)
    (name,) = [g.name for g in ctx.groups]
    assert HRank().scores(ctx)[name].tolist() == [0.75, 0.0, 1.0]


def nuclear_drop(a: torch.Tensor) -> torch.Tensor:
    """Reference CI: ‖A‖_* − ‖A with row j zeroed‖_* for each row j, one matrix at a time."""
    a = a.double()
    full = torch.linalg.matrix_norm(a, "nuc")
    out = []
    for j in range(a.shape[0]):
        b = a.clone()
        b[j] = 0
        out.append(full - torch.linalg.matrix_norm(b, "nuc"))
    return torch.stack(out)


def test_chip_scores_are_nuclear_norm_drops():
    gen = torch.Generator().manual_seed(1)
    n = 3
    x = torch.zeros(n, 4, 5, 5)
    norms_m, norms_r = [], []
    for i in range(n):
        m = torch.randn(25, generator=gen, dtype=torch.float64)
        r = 3 * torch.randn(25, generator=gen, dtype=torch.float64)
        r = r - (r @ m) / (m @ m) * m  # orthogonal to m
        x[i, 0] = m.reshape(5, 5).float()
        x[i, 1] = x[i, 0]  # duplicate of channel 0
        x[i, 3] = r.reshape(5, 5).float()  # orthogonal; channel 2 stays zero
        norms_m.append(float(x[i, 0].double().norm()))
        norms_r.append(float(x[i, 3].double().norm()))
    ctx = make_ctx(identity_net(4), x, batch_size=2)
    (name,) = [g.name for g in ctx.groups]
    scores = CHIP().scores(ctx)[name]
    reference = torch.stack([nuclear_drop(x[i].flatten(1)) for i in range(n)]).mean(0)
    torch.testing.assert_close(scores, reference, atol=1e-9, rtol=1e-9)
    # closed forms: a duplicate of m adds (√2 − 1)‖m‖, an orthogonal row its norm, zero nothing
    dup = (math.sqrt(2) - 1) * sum(norms_m) / n
    expected = torch.tensor([dup, dup, 0.0, sum(norms_r) / n], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)
    assert abs(float(scores[2])) < 1e-12
    assert torch.argsort(scores).tolist()[:1] == [2] and int(torch.argmax(scores)) == 3


@pytest.mark.parametrize("units,positions", [(5, 12), (6, 3), (4, 1)])
def test_channel_independence_matches_reference(units, positions):
    gen = torch.Generator().manual_seed(units * positions)
    a = torch.randn(3, units, positions, generator=gen, dtype=torch.float64)
    a[1, 2] = 0  # a zero row scores 0
    expected = torch.stack([nuclear_drop(a[i]) for i in range(3)])
    for budget in (1, 2**22):  # one matrix per SVD call, and everything at once
        got = channel_independence(a, budget=budget)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert bool((expected >= -1e-12).all())
    assert abs(float(channel_independence(a)[1, 2])) < 1e-12


def test_mean_activation_and_apoz_exact():
    x = torch.zeros(2, 4, 4, 4)
    x[:, 0] = 2.0  # always 2
    x[:, 1, :, :2] = 4.0  # 4 on half the positions,
    x[:, 1, :, 2:] = -3.0  # negative (→ 0 after ReLU) on the other half
    x[:, 2] = -1.0  # always silenced by the ReLU
    x[0, 3] = 1.0  # on in image 0, off in image 1
    ctx = make_ctx(identity_net(4, relu=True), x, batch_size=1)
    (name,) = [g.name for g in ctx.groups]
    assert MeanActivation().scores(ctx)[name].tolist() == [2.0, 2.0, 0.0, 0.5]
    assert APoZ().scores(ctx)[name].tolist() == [1.0, 0.5, 0.0, 0.5]


def test_masked_units_score_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(4, 2, 5, 5)
    ctx = make_ctx(model, x)
    (name,) = [g.name for g in ctx.groups]
    ctx.structure.mask({name: [1]})
    for method in (HRank(), CHIP(), MeanActivation(), APoZ()):
        s = method.scores(ctx)[name]
        assert float(s[1]) == 0.0 and bool((s[[0, 2]] > 0).all()), method.name


@pytest.mark.parametrize(
    "make,bad",
    [
        (lambda: HRank(samples=0), "0"),
        (lambda: CHIP(samples=True), "True"),
        (lambda: HRank(samples=2.5), "2.5"),
        (lambda: ThiNet(images=0), "0"),
        (lambda: ThiNet(samples_per_image="10"), "'10'"),
        (lambda: ThiNet(refit="yes"), "'yes'"),
    ],
)
def test_bad_options_are_named(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model = mipp.create_model("lenet5", in_channels=1, input_size=28).eval()
    return model, torch.randn(64, 1, 28, 28)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("method", ["hrank", "chip", "mean-activation", "apoz", "thinet"])
def test_lenet_end_to_end(lenet, method, allocation):
    model, x = lenet
    result = mipp.prune(
        model, x, method=mipp.make_method(method, allocation=allocation), sparsity=0.5
    )
    report = result.report
    assert report.method == method and report.options["allocation"] == allocation
    assert abs(report.achieved["units"] - 0.5) <= 0.01
    assert report.units_after == sum(len(g.kept) for g in report.groups if not g.collapsed)
    assert result.model(x[:2]).shape == (2, 10)
