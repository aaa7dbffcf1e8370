"""MIPP(stream_features=k): a residual-stream unit keeps the k leading principal components of
its readings at every depth instead of one feature block per tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mipp
from helpers import make_model
from mipp.estimators import GaussianEstimator, LinearEstimator
from mipp.estimators import gaussian as gaussian_module
from mipp.estimators.moments import (
    MomentAccumulator,
    RowMoments,
    principal_axes,
    principal_moments,
    second_moments,
)
from mipp.methods import MIPP
from mipp.methods.targets import principal_unit_features


def _units(n: int = 4000, units: int = 6, f: int = 4, seed: int = 0):
    """x ``(n, U, f)``: each unit's f readings are one latent plus small per-reading noise
    (a stream channel read at f depths); y reads the first four units' latents."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, units, 1, generator=g, dtype=torch.float64)
    x = z + 0.05 * torch.randn(n, units, f, generator=g, dtype=torch.float64) + 3.0
    y = z[:, :4, 0] @ torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = y + 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("k", [1, 2])
def test_principal_moments_equal_the_moments_of_the_projected_samples(k):
    x, y = _units()
    m = second_moments(x, y)
    z = principal_unit_features(x, k)
    assert z.shape == (len(x), 6, k)
    direct = second_moments(z, y)
    proj = principal_moments(m, k)
    assert proj.unit_size == k and proj.n_units == 6
    for a, b in ((proj.sxx, direct.sxx), (proj.sxy, direct.sxy), (proj.mean_x, direct.mean_x)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert principal_moments(m, 4) is m  # k >= b: unchanged


@pytest.mark.parametrize("k", [1, 2])
def test_principal_moments_of_moments_with_rows_are_projected_from_the_rows(k):
    """A wide layer's moments carry their rows and no products: projecting the rows gives the
    moments projected from the full Gram (1e-9), without ever forming that Gram."""
    x, y = _units(n=40, units=30)  # 120 features > 2 × 40 samples: rows kept
    x[:, 7] = 2.0  # a dead unit
    acc = MomentAccumulator(rows_if_wider_than=80)
    for i in range(0, 40, 16):
        acc.update(x[i : i + 16], y[i : i + 16])
    rows = acc.moments()
    assert isinstance(rows, RowMoments)
    proj, ref = principal_moments(rows, k), principal_moments(second_moments(x, y), k)
    assert vars(rows)["_sxx"] is None and vars(rows)["_sxy"] is None  # no D×D Gram formed
    assert proj.samples is None and proj.unit_size == k
    for name in ("sxx", "sxy", "syy", "mean_x"):
        assert torch.allclose(getattr(proj, name), getattr(ref, name), rtol=1e-9, atol=1e-12)
    assert torch.equal(proj.const_x, ref.const_x) and bool(proj.const_units[7])


def test_principal_axes_are_the_leading_orthonormal_eigenvectors_with_a_fixed_sign():
    blocks = torch.diag_embed(torch.tensor([[1.0, 5.0, 3.0]], dtype=torch.float64))
    axes = principal_axes(blocks, 2)[0]
    assert torch.equal(
        axes, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    )
    # random SPD blocks: orthonormal, eigenvectors of the k largest eigenvalues, and each
    # axis's largest-magnitude entry positive (eigh's own sign is arbitrary)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    spd = a @ a.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    axes = principal_axes(spd, 2)
    eye = torch.eye(2, dtype=torch.float64).expand(5, 2, 2)
    assert torch.allclose(axes.transpose(1, 2) @ axes, eye, atol=1e-12)
    top = torch.linalg.eigvalsh(spd).flip(-1)[:, :2]  # descending
    assert torch.allclose(spd @ axes, axes * top.unsqueeze(1), atol=1e-10)
    pivot = axes.abs().argmax(dim=1, keepdim=True)
    assert (torch.gather(axes, 1, pivot) > 0).all()


@pytest.mark.parametrize("est", [LinearEstimator(ridge=1e-9), GaussianEstimator(ridge=1e-9)])
def test_one_component_keeps_each_units_information_when_its_readings_share_one_latent(est):
    """Readings = latent + 5 % noise: the first component holds the latent, so each unit's
    Δ_i with k = 1 is within a few percent of Δ_i on all four readings, and the units the
    target ignores stay near 0 either way."""
    x, y = _units()
    full = est.start(est.prepare(x, y))
    one = est.start(principal_moments(est.prepare(x, y), 1))
    d_full = torch.tensor([full.delta(i).value for i in range(6)])
    d_one = torch.tensor([one.delta(i).value for i in range(6)])
    assert torch.allclose(d_one[:4], d_full[:4], rtol=0.05)
    assert (d_one[4:] < 0.01 * d_one[:4].min()).all()


def test_a_dead_unit_stays_constant_after_projection():
    x, y = _units()
    x[:, 2] = 1.5
    proj = principal_moments(second_moments(x, y), 2)
    assert proj.const_units.tolist() == [False, False, True, False, False, False]
    assert proj.sxx[4:6].abs().max() == 0 and proj.sxy[4:6].abs().max() == 0


def test_moments_with_folds_are_refused():
    from mipp.estimators.moments import fold_moments

    x, y = _units(n=100)
    m = second_moments(x, y)
    m = dataclasses.replace(m, folds=fold_moments(x, y, 2, m))
    with pytest.raises(ValueError, match="folds"):
        principal_moments(m, 1)


@pytest.mark.parametrize("estimator", ["gaussian", "linear", "ksg"])
def test_mipp_with_stream_features_prunes_a_residual_net_and_reports_k_per_stream_unit(estimator):
    net, x = make_model("tiny-resnet", n=256)
    method = MIPP(estimator=estimator, stream_features=1, reconstruct=False)
    res = mipp.prune(net, x, method=method, sparsity=0.4, scope="all", calib_samples=256)
    groups = {g.name: g for g in res.report.groups}
    streams = [g for g in groups.values() if g.kind == "stream"]
    assert streams and all(g.features_per_unit == 1 for g in streams)
    assert any(g.width_after < g.width_before for g in streams)
    assert res.report.options["stream_features"] == 1
    assert res.model(x[:4]).shape == net(x[:4]).shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stream_features": 0}, "stream_features must be None .* got 0"),
        ({"stream_features": 1.5}, "stream_features must be None .* got 1.5"),
        ({"stream_features": 1, "confidence": 0.9}, "threshold and target modes"),
    ],
)
def test_bad_stream_features_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MIPP(**kwargs)


def test_stream_features_decide_the_same_from_the_rows_of_wide_streams(monkeypatch):
    """scope "all", 2×2 pooling, 16 calibration samples: the stream groups (64 and 48
    features) keep their rows and are projected from them; with the rows never kept
    (DUAL_FACTOR huge) they are projected from the moments. The same widths either way."""
    net, x = make_model("tiny-resnet", n=16)
    projected: list[bool] = []
    real = principal_moments

    def spy(moments, k):
        projected.append(moments.samples is not None)
        return real(moments, k)

    monkeypatch.setattr("mipp.methods.targets.principal_moments", spy)
    method = MIPP(reconstruct=False, pool=2, stream_features=1)
    rows = mipp.prune(net, x, method=method, sparsity=0.4, scope="all", calib_samples=16)
    assert projected and all(projected), "the streams were not projected from their rows"
    monkeypatch.setattr(gaussian_module, "DUAL_FACTOR", 10**9)
    projected.clear()
    grams = mipp.prune(net, x, method=method, sparsity=0.4, scope="all", calib_samples=16)
    assert projected and not any(projected)
    assert rows.report.widths == grams.report.widths
    assert rows.report.achieved == pytest.approx(grams.report.achieved)
