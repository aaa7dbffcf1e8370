"""Compensation: least-squares re-fit of consumers after removal, BatchNorm recalibration."""

from __future__ import annotations

import copy
import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mipp.surgery.repair as repair
from helpers import make_model
from mipp.errors import MippError
from mipp.progress import ProgressEvent
from mipp.surgery.capture import forward_until
from mipp.surgery.repair import LayerFit, compensate, recalibrate_bn
from mipp.surgery.structure import build_structure


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pruned(model: nn.Module, x: torch.Tensor, removed: dict[str, list[int]]):
    """A pruned deep copy of ``model`` and the ``kept_out`` its producers imply."""
    pruned = copy.deepcopy(model)
    structure = build_structure(pruned, x[:2])
    kept_out = {}
    for g in structure.groups:
        if g.name in removed:
            keep = [j for j in range(g.size) if j not in set(removed[g.name])]
            for p in g.producers:
                kept_out[p] = g.channels(keep, p)
    structure.remove(removed)
    return pruned, kept_out


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _duplicate(layer: nn.Module, src: int, dst: int, factor: float) -> None:
    """Make unit ``dst`` of ``layer`` exactly ``factor`` × unit ``src`` (factor > 0)."""
    with torch.no_grad():
        layer.weight[dst] = factor * layer.weight[src]
        layer.bias[dst] = factor * layer.bias[src]


# ----------------------------------------------------------------------------- exactness


def test_linear_exact_restoration():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    _duplicate(net[0], 0, 2, 2.0)  # relu(2z) = 2 relu(z): unit 2 is redundant
    x, fresh = torch.randn(64, 5, generator=_gen(1)), torch.randn(32, 5, generator=_gen(2))
    pruned, kept_out = _pruned(net, x, {"0": [2]})
    assert kept_out == {"0": [0, 1, 3, 4, 5]}
    with torch.no_grad():
        assert (pruned(fresh) - net(fresh)).abs().max() > 1e-2  # without compensation
    params = [id(p) for p in pruned.parameters()]
    fits = compensate(net, pruned, x, kept_out=kept_out, ridge=1e-8)
    assert [(f.layer, f.rows, f.features, f.outputs, f.skipped) for f in fits] == [
        ("2", 64, 5, 3, None)
    ]
    assert fits[0].error_before > 1e-3
    assert fits[0].error_after < 1e-9
    assert [id(p) for p in pruned.parameters()] == params  # written in place
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), net(fresh), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [1, 2])
def test_conv_exact_restoration_through_patches(dim):
    torch.manual_seed(0)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    net = nn.Sequential(
        conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 3, 3, padding=1, stride=2)
    ).eval()
    _duplicate(net[0], 0, 2, 3.0)
    shape = (24, 2, 9) if dim == 1 else (24, 2, 9, 9)
    x, fresh = torch.randn(shape, generator=_gen(1)), torch.randn(shape, generator=_gen(2))
    pruned, kept_out = _pruned(net, x, {"0": [2]})
    with torch.no_grad():
        assert (pruned(fresh) - net(fresh)).abs().max() > 1e-2
    fits = compensate(net, pruned, x, kept_out=kept_out, ridge=1e-8, locations=4, batch_size=10)
    (fit,) = fits
    assert (fit.layer, fit.rows, fit.features, fit.outputs) == ("2", 24 * 4, 3 * 3**dim, 3)
    assert fit.error_before > 1e-3 and fit.error_after < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), net(fresh), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["single-pass", "per-layer"])
def test_linear_on_sequences_fits_the_kept_features_not_positions(path):
    """A Linear reading (n, T, F) keeps output *features* (the last dimension)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    _duplicate(net[0], 6, 2, 2.0)
    keep = [0, 1, 3, 4, 5, 6, 7]  # index 7 >= T = 4: would fail on the sequence dimension
    small = copy.deepcopy(net)
    with torch.no_grad():
        small[0] = nn.Linear(5, 7)
        small[0].weight.copy_(net[0].weight[keep])
        small[0].bias.copy_(net[0].bias[keep])
        small[2] = nn.Linear(7, 3)
        small[2].weight.copy_(net[2].weight[:, keep])
        small[2].bias.copy_(net[2].bias)
    x = torch.randn(20, 4, 5, generator=_gen(1))
    (fit,) = compensate(net, small, x, kept_out={"0": keep}, ridge=1e-8, batch_size=8, path=path)
    assert (fit.layer, fit.rows, fit.features, fit.outputs) == ("2", 20 * 4, 7, 3)
    assert fit.error_after < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=0)


def _three_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
    ).eval()


def test_sequential_fits_stay_exact_across_two_pruned_layers():
    net = _three_layers()
    _duplicate(net[0], 0, 2, 2.0)
    _duplicate(net[2], 1, 4, 1.5)
    x, fresh = torch.randn(80, 5, generator=_gen(1)), torch.randn(32, 5, generator=_gen(2))
    pruned, kept_out = _pruned(net, x, {"0": [2], "2": [4]})
    assert kept_out == {"0": [0, 1, 3, 4, 5], "2": [0, 1, 2, 3, 5]}
    fits = compensate(net, pruned, x, kept_out=kept_out, ridge=1e-8)
    assert [f.layer for f in fits] == ["2", "4"]  # forward order
    assert all(f.error_after < 1e-9 < f.error_before for f in fits)
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), net(fresh), atol=1e-5, rtol=0)


def _ridge_reference(x_in, y, *, ridge, bias):
    """Closed-form ridge on all rows: (A + λ diag(1..1, 0)) W = B, λ = ridge · mean diag."""
    d = x_in.shape[1]
    xa = torch.cat([x_in, torch.ones(len(x_in), 1, dtype=x_in.dtype)], 1) if bias else x_in
    a = xa.T @ xa
    lam = ridge * (x_in.T @ x_in).diagonal().mean()
    reg = a.clone()
    reg.diagonal()[:d] += lam
    w = torch.linalg.solve(reg, xa.T @ y)
    resid = y - xa @ w
    error = float((resid**2).sum() / ((y - y.mean(0)) ** 2).sum())
    return w, error


def _stacked(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).T
    return w if layer.bias is None else torch.cat([w, layer.bias.detach()[None]])


def test_second_fit_reads_the_already_compensated_input():
    net = _three_layers().double()
    x = torch.randn(60, 5, dtype=torch.float64, generator=_gen(1))
    pruned, kept_out = _pruned(net, x, {"0": [1, 4], "2": [0, 3]})  # no exact restoration
    fits = compensate(net, pruned, x, kept_out=kept_out, ridge=1e-3)
    assert fits[0].error_after > 1e-4  # the first fit leaves a residual the second sees
    with torch.no_grad():
        seen = pruned[3](pruned[2](pruned[1](pruned[0](x))))  # fc "2" already re-fitted
        target = net(x)
    w, error = _ridge_reference(seen, target, ridge=1e-3, bias=True)
    torch.testing.assert_close(_stacked(pruned[4]), w, rtol=1e-8, atol=1e-10)
    assert fits[1].error_after == pytest.approx(error, rel=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fit_equals_closed_form_ridge(bias):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4, bias=bias))
    net = net.double().eval()
    x = torch.randn(50, 6, dtype=torch.float64, generator=_gen(1))
    pruned, kept_out = _pruned(net, x, {"0": [1, 3, 6, 8]})
    with torch.no_grad():
        before = _stacked(pruned[2]).clone()
        seen, target = pruned[1](pruned[0](x)), net(x)
    (fit,) = compensate(net, pruned, x, kept_out=kept_out, ridge=0.1, batch_size=7)
    w, error = _ridge_reference(seen, target, ridge=0.1, bias=bias)
    torch.testing.assert_close(_stacked(pruned[2]), w, rtol=1e-8, atol=1e-12)
    assert fit.rows == 50 and fit.features == 6 and fit.outputs == 4
    assert fit.error_after == pytest.approx(error, rel=1e-6)
    resid = target - (seen @ before[:6] + (before[6] if bias else 0))
    expected_before = float((resid**2).sum() / ((target - target.mean(0)) ** 2).sum())
    assert fit.error_before == pytest.approx(expected_before, rel=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [20, 37, 60])
def test_linear_fit_with_few_rows_equals_closed_form_ridge(bias, n):
    """Up to as many rows as features (36, +1 with a bias) the rows are kept and the fit
    solved in its dual form; past that, A and B are summed: both give the closed-form ridge
    weights and errors (n = 37 crosses over in the last batch)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 4, bias=bias))
    net = net.double().eval()
    x = torch.randn(n, 6, dtype=torch.float64, generator=_gen(2))
    pruned, kept_out = _pruned(net, x, {"0": [1, 3, 6, 8]})
    with torch.no_grad():
        seen, target = pruned[1](pruned[0](x)), net(x)
    (fit,) = compensate(net, pruned, x, kept_out=kept_out, ridge=0.1, batch_size=7)
    w, error = _ridge_reference(seen, target, ridge=0.1, bias=bias)
    torch.testing.assert_close(_stacked(pruned[2]), w, rtol=1e-7, atol=1e-10)
    assert fit.rows == n and fit.features == 36
    assert fit.error_after == pytest.approx(error, rel=1e-6, abs=1e-12)


def _conv_net(bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(5, 4, 3, padding=1, stride=2, bias=bias),
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("locations", [9, 100])
def test_conv_fit_with_all_positions_equals_unfold_reference(bias, locations):
    net = _conv_net(bias)
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64, generator=_gen(1))  # output 3×3: P = 9
    pruned, kept_out = _pruned(net, x, {"0": [0, 3]})
    with torch.no_grad():
        act = pruned[1](pruned[0](x))
        target = net(x)
    patches = F.unfold(act, 3, padding=1, stride=2)  # (12, 3·9, 9)
    rows = patches.transpose(1, 2).reshape(-1, 27)
    y = target.flatten(2).transpose(1, 2).reshape(-1, 4)
    (fit,) = compensate(net, pruned, x, kept_out=kept_out, ridge=1e-3, locations=locations)
    w, error = _ridge_reference(rows, y, ridge=1e-3, bias=bias)
    torch.testing.assert_close(_stacked(pruned[2]), w, rtol=1e-8, atol=1e-12)
    assert fit.rows == 12 * 9 and fit.features == 27
    assert fit.error_after == pytest.approx(error, rel=1e-6)


def test_conv_position_sampling_is_seeded_and_leaves_global_rng_alone():
    net = _conv_net(True)
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64, generator=_gen(1))
    state = torch.get_rng_state()
    weights = []
    for seed in (0, 0, 1):
        pruned, kept_out = _pruned(net, x, {"0": [0, 3]})
        (fit,) = compensate(net, pruned, x, kept_out=kept_out, locations=4, seed=seed)
        assert fit.rows == 12 * 4
        weights.append(pruned[2].weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert torch.equal(torch.get_rng_state(), state)


def test_unsupported_conv_is_skipped_with_a_reason():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)
    ).eval()
    x = torch.randn(6, 2, 8, 8, generator=_gen(1))
    pruned, kept_out = _pruned(net, x, {"0": [1]})
    pruned[2].padding_mode = "circular"
    before = pruned[2].weight.detach().clone()
    (fit,) = compensate(net, pruned, x, kept_out=kept_out)
    assert fit.skipped is not None and "circular" in fit.skipped
    assert fit.rows == 0 and math.isnan(fit.error_after)
    assert torch.equal(pruned[2].weight, before)


# ----------------------------------------------------------------------------- options


def _small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(20, 4, generator=_gen(1))
    pruned, kept_out = _pruned(net, x, {"0": [0]})
    return net, pruned, x, kept_out


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("ridge", -1.0, "ridge.*-1.0"),
        ("ridge", float("nan"), "ridge.*nan"),
        ("ridge", float("inf"), "ridge.*inf"),
        ("locations", 0, "locations.*>= 1.*0"),
        ("locations", 2.5, "locations.*2.5"),
        ("batch_size", 0, "batch_size.*>= 1.*0"),
        ("batch_size", True, "batch_size.*True"),
        ("path", "fast", r"path must be one of 'auto', 'single-pass', 'per-layer', got 'fast'"),
        ("memory_budget", -1, "memory_budget.*-1"),
        ("memory_budget", 1.5, "memory_budget.*1.5"),
    ],
)
def test_bad_options_raise_naming_the_value(option, value, match):
    net, pruned, x, kept_out = _small()
    with pytest.raises(ValueError, match=match):
        compensate(net, pruned, x, kept_out=kept_out, **{option: value})


def test_bad_inputs_raise_clear_errors():
    net, pruned, x, kept_out = _small()
    with pytest.raises(ValueError, match=r"at least one.*\(0, 4\)"):
        compensate(net, pruned, x[:0], kept_out=kept_out)
    with pytest.raises(MippError, match=r"'nope' is not a module.*pruned and original"):
        compensate(net, pruned, x, kept_out=kept_out, layers=["nope"])
    with pytest.raises(MippError, match="'1' must be a Conv1d, Conv2d or Linear"):
        compensate(net, pruned, x, kept_out=kept_out, layers=["1"])
    with pytest.raises(MippError, match="kept_out does not say"):
        compensate(net, pruned, x, kept_out={}, layers=["0", "2"])
    with pytest.raises(MippError, match=r"kept_out\['0'\] must hold 5 distinct"):
        compensate(net, pruned, x, kept_out={"0": [0, 1, 2, 3, 9]}, layers=["0", "2"])
    with pytest.raises(MippError, match=r"kept_out names layers missing.*'fc9'"):
        compensate(net, pruned, x, kept_out={**kept_out, "fc9": [0]})
    with pytest.raises(ValueError, match="different modules"):
        compensate(net, net, x, kept_out={})
    with pytest.raises(ValueError, match=r"batch_size.*-3"):
        recalibrate_bn(net, x, batch_size=-3)


def test_nothing_pruned_means_nothing_fitted():
    net, _, x, _ = _small()
    assert compensate(net, copy.deepcopy(net), x, kept_out={}) == []


def test_layer_fit_is_frozen():
    fit = LayerFit("fc", 10, 3, 2, 0.5, 0.1)
    with pytest.raises(AttributeError):
        fit.rows = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- the two paths


def _run(model, x, removed, *, path, tweak=None, **options):
    """Compensate a fresh pruned copy of ``model`` along ``path``: (fits, pruned model)."""
    pruned, kept_out = _pruned(model, x, removed)
    if tweak is not None:
        tweak(pruned)
    fits = compensate(model, pruned, x, kept_out=kept_out, path=path, **options)
    return fits, pruned


def _assert_paths_agree(model, x, removed, *, tweak=None, **options):
    """single-pass and per-layer: the same LayerFits and weights (≤ 1e-6); returns the fits."""
    fits_a, net_a = _run(model, x, removed, path="per-layer", tweak=tweak, **options)
    fits_b, net_b = _run(model, x, removed, path="single-pass", tweak=tweak, **options)
    assert [(f.layer, f.rows, f.features, f.outputs, f.skipped) for f in fits_a] == [
        (f.layer, f.rows, f.features, f.outputs, f.skipped) for f in fits_b
    ]
    for fa, fb in zip(fits_a, fits_b, strict=True):
        for before, after in ((fa.error_before, fb.error_before), (fa.error_after, fb.error_after)):
            assert (math.isnan(before) and math.isnan(after)) or abs(before - after) <= 1e-6
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    assert list(state_a) == list(state_b)
    for k, v in state_a.items():
        assert (v.double() - state_b[k].double()).abs().max() <= 1e-6, k
    fitted = [f for f in fits_a if f.skipped is None]
    assert any(f.error_after < f.error_before for f in fitted)  # the fits did something
    return fits_a


def _mlp(depth: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    widths = [6, 12, 10, 9, 8, 7][: depth + 1]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 3)).eval()


def _mlp_removed(depth: int = 3) -> dict[str, list[int]]:
    return {str(2 * i): [0, 2 + i] for i in range(depth)}


def test_paths_agree_on_an_mlp_with_a_short_last_batch():
    x = torch.randn(50, 6, generator=_gen(1))  # batches 16, 16, 16, 2
    fits = _assert_paths_agree(_mlp(), x, _mlp_removed(), batch_size=16)
    assert [f.layer for f in fits] == ["2", "4", "6"]


def _conv_bn_net(dim: int) -> nn.Sequential:
    torch.manual_seed(0)
    conv, bn, pool = (
        (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        if dim == 1
        else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    )
    net = nn.Sequential(
        conv(3, 8, 3, padding=1), bn(8), nn.ReLU(),
        conv(8, 8, 3, padding=1), bn(8), nn.ReLU(), pool(2),
        conv(8, 7, 3, padding=1, stride=2, bias=False), bn(7), nn.ReLU(),
        conv(7, 6, 3, padding=1), bn(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2**dim, 4),
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net.eval()


def _circular(pruned: nn.Module) -> None:
    pruned[7].padding_mode = "circular"  # skipped: the positions drawn must skip it too


@pytest.mark.parametrize(
    ("dim", "unfold_budget", "tweak"),
    [(2, None, None), (2, 8 * 9 * 64 * 3, None), (2, None, _circular), (1, 8 * 3 * 8 * 2, None)],
    ids=["conv2d", "conv2d-chunked", "conv2d-skipped-layer", "conv1d-chunked"],
)
def test_paths_agree_on_a_conv_net_with_batchnorm(dim, unfold_budget, tweak, monkeypatch):
    if unfold_budget is not None:  # several unfold chunks per batch, each with its own draws
        monkeypatch.setattr(repair, "_UNFOLD_BUDGET", unfold_budget)
    x = torch.randn((22, 3, 8) if dim == 1 else (22, 3, 8, 8), generator=_gen(1))
    removed = {"0": [1, 4], "3": [0, 5, 6], "7": [2], "10": [3]}
    fits = _assert_paths_agree(
        _conv_bn_net(dim), x, removed, tweak=tweak, batch_size=8, locations=5
    )
    assert [f.layer for f in fits] == ["3", "7", "10", "14"]
    positions = 8**dim  # the first fitted conv sees P = 64 (2-D) or 8 (1-D) > 5 locations
    assert fits[0].rows == 22 * 5 < 22 * positions
    assert (fits[1].skipped is not None) == (tweak is not None)


def test_paths_agree_on_a_residual_net():
    model, _ = make_model("tiny-resnet")
    x = torch.randn(21, 3, 8, 8, generator=_gen(1))
    structure = build_structure(copy.deepcopy(model), x[:2])
    removed = {g.name: list(range(0, g.size, 2)) for g in structure.groups}
    fits = _assert_paths_agree(model, x, removed, batch_size=8, locations=6)
    assert len(fits) >= 5


def test_paths_agree_on_a_cifar_resnet():
    import mipp

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mipp.create_model("resnet20", in_channels=1, input_size=16).eval()
    x = torch.randn(10, 1, 16, 16, generator=_gen(1))
    structure = build_structure(copy.deepcopy(model), x[:2])
    removed = {g.name: list(range(g.size // 2)) for g in structure.in_scope("internal")}
    fits = _assert_paths_agree(model, x, removed, batch_size=4, locations=8)
    assert len(fits) == len(removed)  # each block's second conv


class _SharedHead(nn.Module):
    """``head`` runs twice, on two branches; ``out`` reads the sum after both calls."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(5, width), nn.Linear(5, width)
        self.head, self.out = nn.Linear(width, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.fa(x)), torch.relu(self.fb(x))
        return self.out(torch.relu(self.head(a) + self.head(b)))


def _shared_pair() -> tuple[_SharedHead, _SharedHead, dict[str, list[int]]]:
    torch.manual_seed(0)
    net = _SharedHead().eval()
    keep = [0, 1, 3, 4, 6, 7]
    small = _SharedHead(len(keep)).eval()
    with torch.no_grad():
        for name in ("fa", "fb"):
            getattr(small, name).weight.copy_(getattr(net, name).weight[keep])
            getattr(small, name).bias.copy_(getattr(net, name).bias[keep])
        small.head.weight.copy_(net.head.weight[:, keep])
        small.head.bias.copy_(net.head.bias)
        small.out.load_state_dict(net.out.state_dict())
    return net, small, {"fa": keep, "fb": keep}


def test_paths_agree_when_a_layer_runs_twice():
    """head is fitted on its first call; its second call, before out, uses the new weights."""
    x = torch.randn(30, 5, generator=_gen(1))
    results = []
    for path in ("per-layer", "single-pass"):
        net, small, kept_out = _shared_pair()
        fits = compensate(
            net, small, x, kept_out=kept_out, layers=["out", "head"], batch_size=8, path=path
        )
        results.append((fits, small.state_dict()))
    (fits_a, state_a), (fits_b, state_b) = results
    assert [f.layer for f in fits_a] == [f.layer for f in fits_b] == ["head", "out"]
    assert fits_a[0].rows == 30  # one row per sample: the first call only
    for fa, fb in zip(fits_a, fits_b, strict=True):
        assert abs(fa.error_after - fb.error_after) <= 1e-6
    for k, v in state_a.items():
        assert (v - state_b[k]).abs().max() <= 1e-6, k


def test_paths_agree_under_the_callers_autocast():
    """The single pass's worker threads run under the caller's (thread-local) autocast."""
    x = torch.randn(40, 6, generator=_gen(1))
    plain = _run(_mlp(), x, _mlp_removed(), path="single-pass", batch_size=16)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_paths_agree(_mlp(), x, _mlp_removed(), batch_size=16)
        mixed = _run(_mlp(), x, _mlp_removed(), path="single-pass", batch_size=16)[1]
    assert (plain[2].weight - mixed[2].weight).abs().max() > 1e-4  # bfloat16 inputs were seen


def _count_forwards(model: nn.Module) -> tuple[list[int], object]:
    """Count the forwards of ``model`` that start (a pre-hook: early-stopped ones count too)."""
    calls = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("depth", [2, 5])
def test_single_pass_runs_each_network_once_per_batch_whatever_the_depth(depth):
    """The linear-in-depth invariant, by counting forwards: the single pass runs the original
    once per batch and the pruned model once per batch plus one probe of one sample; the
    per-layer path runs each once per batch *per layer*."""
    net = _mlp(depth)
    x = torch.randn(50, 6, generator=_gen(1))
    batches = 4  # 16, 16, 16, 2
    counts = {}
    for path in ("single-pass", "per-layer"):
        pruned, kept_out = _pruned(net, x, _mlp_removed(depth))
        calls_orig, h_orig = _count_forwards(net)
        calls_mine, h_mine = _count_forwards(pruned)
        fits = compensate(net, pruned, x, kept_out=kept_out, batch_size=16, path=path)
        h_orig.remove()
        h_mine.remove()
        assert len(fits) == depth
        counts[path] = (calls_orig[0], calls_mine[0])
    assert counts["single-pass"] == (batches, batches + 1)
    assert counts["per-layer"] == (depth * batches, depth * batches + 1)


def test_auto_path_falls_back_to_per_layer_over_the_memory_budget():
    net = _mlp(3)
    x = torch.randn(50, 6, generator=_gen(1))
    seen = {}
    for budget in (None, 10**12, 0):
        pruned, kept_out = _pruned(net, x, _mlp_removed(3))
        events: list[ProgressEvent] = []
        calls, handle = _count_forwards(net)
        compensate(
            net, pruned, x, kept_out=kept_out, batch_size=16, memory_budget=budget,
            progress=events.append,
        )  # fmt: skip
        handle.remove()
        assert [e.stage for e in events] == ["compensation"] * 3  # one event per layer
        seen[budget] = ({e.fields["path"] for e in events}, calls[0])
    assert seen[None] == seen[10**12] == ({"single-pass"}, 4)
    assert seen[0] == ({"per-layer"}, 12)


class _Boom(nn.Module):
    """Raises in batches of more than one sample once armed (the probe runs one sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and x.shape[0] > 1:
            raise RuntimeError("boom")
        return x


def _boom_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), _Boom(), nn.Linear(8, 3)
    ).eval()


def _workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("mipp-compensation")]


@pytest.mark.parametrize("where", ["pruned", "original"])
def test_single_pass_error_removes_hooks_restores_modes_and_ends_threads(where):
    net = _boom_net()
    x = torch.randn(40, 5, generator=_gen(1))
    pruned, kept_out = _pruned(net, x, {"0": [1], "2": [3]})
    for model in (net, pruned):
        model.train()
        model[1].eval()  # mixed modes come back as they were
    (pruned if where == "pruned" else net)[4].armed = True
    before = pruned[2].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        compensate(net, pruned, x, kept_out=kept_out, batch_size=16, path="single-pass")
    for model in (net, pruned):
        assert _hooks(model) == 0
        assert model.training and model[0].training and not model[1].training
    assert _workers_alive() == []
    # the pruned forward raised after layer "2" had been fitted (after its first batch); the
    # original's raised before any fit
    assert torch.equal(pruned[2].weight, before) == (where == "original")


class _Skipper(nn.Module):
    """Once ``skip`` is set, bypasses the module fc2 for batches of more than one sample (the
    probe runs one sample, so the probe's order does not hold for the batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.skip and x.shape[0] > 1:  # the same function, without calling the module
            return self.fc3(torch.relu(F.linear(h, self.fc2.weight, self.fc2.bias)))
        return self.fc3(torch.relu(self.fc2(h)))


@pytest.mark.parametrize("path", ["single-pass", "per-layer"])
def test_a_layer_missing_from_the_batches_forward_is_a_clear_error(path):
    torch.manual_seed(0)
    net = _Skipper().eval()
    x = torch.randn(20, 5, generator=_gen(1))
    pruned = copy.deepcopy(net)
    with torch.no_grad():
        pruned.fc1.weight.data = pruned.fc1.weight.data[:6]
        pruned.fc1.bias.data = pruned.fc1.bias.data[:6]
        pruned.fc2.weight.data = pruned.fc2.weight.data[:, :6]
    pruned.fc1.out_features = pruned.fc2.in_features = 6
    pruned.skip = True  # the original runs fc2 in every batch, the pruned model only in the probe
    with pytest.raises(MippError, match="did not run in the forward pass"):
        compensate(net, pruned, x, kept_out={"fc1": list(range(6))}, batch_size=8, path=path)
    assert _hooks(net) == _hooks(pruned) == 0 and _workers_alive() == []


# ----------------------------------------------------------------------------- BatchNorm


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)
        self.boom = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.fc(self.drop(self.relu(self.bn2(self.conv(x)))).flatten(1)))
        if self.boom:
            raise RuntimeError("boom")
        return self.out(h)


def _bn_net() -> tuple[_BNNet, torch.Tensor]:
    torch.manual_seed(0)
    net = _BNNet()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.2)
    return net, torch.randn(32, 2, 8, 8, generator=_gen(1)) + 0.5


def test_recalibrate_bn_single_batch_gives_the_batch_statistics():
    net, x = _bn_net()
    net.train()  # the mode to restore
    assert recalibrate_bn(net, x, batch_size=64) == 2
    with torch.no_grad():
        h = net.conv(x)
        m2, v2 = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
        # what bn1 saw: bn2 normalising with batch statistics, Dropout as identity (eval)
        hb = (h - m2[:, None, None]) / torch.sqrt(
            h.var((0, 2, 3), unbiased=False)[:, None, None] + net.bn2.eps
        )
        hb = hb * net.bn2.weight[:, None, None] + net.bn2.bias[:, None, None]
        z = net.fc(net.relu(hb).flatten(1))
    torch.testing.assert_close(net.bn2.running_mean, m2, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.bn2.running_var, v2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.bn1.running_mean, z.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(net.bn1.running_var, z.var(0), atol=1e-5, rtol=1e-5)
    assert int(net.bn2.num_batches_tracked) == 1
    assert all(m.training for m in net.modules())
    assert net.bn2.momentum == 0.3 and net.bn1.momentum == 0.1


def test_recalibrate_bn_averages_batches_and_merges_a_last_single_sample():
    net, x = _bn_net()
    net.eval()
    x = x[:21]  # batches of 10 and 11 (a last batch of one is merged)
    assert recalibrate_bn(net, x, batch_size=10) == 2
    with torch.no_grad():
        h = net.conv(x)
    parts = (h[:10], h[10:])
    mean = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)
    var = torch.stack([p.var((0, 2, 3)) for p in parts]).mean(0)
    torch.testing.assert_close(net.bn2.running_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.bn2.running_var, var, atol=1e-5, rtol=1e-5)
    assert int(net.bn2.num_batches_tracked) == 2
    assert not any(m.training for m in net.modules())


def test_recalibrate_bn_restores_everything_when_the_forward_raises():
    net, x = _bn_net()
    net.train()
    net.drop.eval()  # mixed modes come back as they were
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.boom = True
    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_bn(net, x)
    assert net.training and net.bn2.training and not net.drop.training
    assert net.bn2.momentum == 0.3 and net.bn1.momentum == 0.1
    for k, v in stats.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert _hooks(net) == 0


def test_recalibrate_bn_without_batchnorm_returns_zero():
    net, _, x, _ = _small()
    assert recalibrate_bn(net, x) == 0


def test_forward_until_stops_early_and_cleans_up_on_error():
    net, x = _bn_net()
    net.train()
    net.drop.eval()
    with forward_until(net, net.fc, record="output") as run:
        out = run(x)
        assert not net.training  # eval inside the block
    with torch.no_grad():
        expected = net.eval().fc(net.drop(net.relu(net.bn2(net.conv(x)))).flatten(1))
    net.train()
    net.drop.eval()
    torch.testing.assert_close(out, expected)
    assert net.training and not net.drop.training and _hooks(net) == 0

    net.boom = True  # raised after fc: the early stop comes first
    with forward_until(net, net.out, record="input") as run, pytest.raises(RuntimeError):
        run(x)
    assert net.training and not net.drop.training and _hooks(net) == 0
    with forward_until(net, net.bn1, record="input") as run:
        run(x)  # stops before the raise
    with (
        pytest.raises(MippError, match="did not run"),
        forward_until(net, nn.Linear(1, 1), record="input") as run,
    ):
        net.boom = False
        run(x)
    assert _hooks(net) == 0


# ----------------------------------------------------------------------------- a real model


def test_compensation_lowers_one_shot_error_on_vgg():
    """Random ~50 % per group of a narrow VGG-11 with BatchNorm; error on held-out inputs."""
    model, _ = make_model("vgg11-narrow")
    x = torch.randn(128, 3, 32, 32, generator=_gen(1))
    held_out = torch.randn(64, 3, 32, 32, generator=_gen(2))
    structure = build_structure(copy.deepcopy(model), x[:2])
    gen = _gen(3)
    removed = {
        g.name: torch.randperm(g.size, generator=gen)[: g.size // 2].tolist()
        for g in structure.groups
    }
    plain, kept_out = _pruned(model, x, removed)
    fitted = copy.deepcopy(plain)
    fits = compensate(model, fitted, x, kept_out=kept_out)
    assert [f.layer for f in fits] == [f"features.conv{i}" for i in range(2, 9)] + ["fc"]
    assert all(f.error_after < f.error_before for f in fits)
    with torch.no_grad():
        ref = model(held_out)
        err_plain = F.mse_loss(plain(held_out), ref)
        err_fitted = F.mse_loss(fitted(held_out), ref)
    assert err_fitted < 0.25 * err_plain  # measured: 0.0008 vs 0.025 (held-out logits MSE)


# ----------------------------------------------------------------------- through mipp.pipeline


@pytest.mark.parametrize("method", ["mipp", "l1", "snip"])
def test_prune_compensate_lowers_logit_error_and_is_reported(method, tmp_path):
    import mipp
    from mipp.report import PruneReport

    net, _ = make_model("vgg11-narrow", n=2)
    x = torch.randn(400, 3, 32, 32, generator=_gen(3))
    data = (x, torch.randint(0, 10, (400,), generator=_gen(4)))
    plain = mipp.prune(net, data, method=method, sparsity=0.5, calib_samples=400, compensate=False)
    fixed = mipp.prune(net, data, method=method, sparsity=0.5, calib_samples=400, compensate=True)
    # same units removed; only the weights differ
    assert plain.report.removed == fixed.report.removed
    held_out = torch.randn(200, 3, 32, 32, generator=_gen(5))
    with torch.no_grad():
        ref = net(held_out)
        err_plain = float(((plain.model(held_out) - ref) ** 2).mean())
        err_fixed = float(((fixed.model(held_out) - ref) ** 2).mean())
    assert err_fixed < 0.25 * err_plain
    fits = fixed.report.compensation
    assert fits and plain.report.compensation == []
    assert all(f["error_after"] < f["error_before"] for f in fits if f["skipped"] is None)
    assert fixed.report.options["compensate"] is True and "compensation" in fixed.report.timings
    assert plain.report.options["compensate"] is False
    back = PruneReport.load(fixed.report.save(tmp_path / "r.json"))
    assert back.compensation == fits


def test_prune_compensate_keeps_a_collapsed_layer_dead():
    import mipp
    from mipp.methods.baselines import L1Norm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[2].weight.mul_(1e-6)
    net.eval()
    x = torch.randn(64, 6, generator=_gen(1))
    l1 = L1Norm(normalize="none", allocation="global")
    res = mipp.prune(net, x, method=l1, sparsity=0.5, compensate=True)
    assert res.report.collapsed == ["2"]
    out = res.model(x)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)  # still constant
    assert res.model[2].weight.abs().sum() == 0


def test_prune_recalibrate_bn_uses_the_calibration_statistics():
    import mipp

    net, _ = make_model("vgg11-narrow", n=2)
    x = torch.randn(128, 3, 32, 32, generator=_gen(6))
    res = mipp.prune(net, x, sparsity=0.3, calib_samples=128, batch_size=128, recalibrate_bn=True)
    conv, bn = res.model.features.conv1, res.model.features.bn1
    with torch.no_grad():
        pre = conv(x)
    assert torch.allclose(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert res.model.training == net.training  # modes restored after recalibration


@pytest.mark.parametrize("flag", ["compensate", "recalibrate_bn"])
def test_prune_repair_flags_must_be_booleans(flag):
    import mipp

    net, x = make_model("lenet5", n=8)
    with pytest.raises(ValueError, match=f"{flag} must be True, False or None .*got 'yes'"):
        mipp.prune(net, x, sparsity=0.5, **{flag: "yes"})


def test_mipp_reconstructs_by_default_and_baselines_do_not():
    """compensate=None takes the method's own repairs: MIPP's reconstruction, none for L1."""
    import mipp
    from mipp.methods import MIPP

    net, x = make_model("lenet5", n=400)
    assert mipp.prune(net, x, sparsity=0.5).report.options["compensate"] is True
    assert mipp.prune(net, x, method="l1", sparsity=0.5).report.options["compensate"] is False
    off = mipp.prune(net, x, method=MIPP(reconstruct=False), sparsity=0.5).report
    paper = mipp.prune(net, x, method=MIPP(paper=True), sparsity=0.5).report
    assert off.options["compensate"] is False and off.compensation == []
    assert paper.options["compensate"] is False and paper.options["estimator"] == "linear"
    # an explicit pipeline flag wins over the method's choice
    assert mipp.prune(net, x, sparsity=0.5, compensate=False).report.compensation == []
