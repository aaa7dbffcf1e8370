"""Tests for the ``ksg`` estimator: the distance cache against a direct k-NN computation,
closed-form Gaussian MI / CMI, independence, a non-monotone (x²) dependence the linear
estimator misses, invariances, option checks, and a run of the whole pipeline."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch import Tensor

import mipp
from mipp.estimators import KSGData, KSGEstimator, LinearEstimator, make_estimator
from mipp.zoo.data import gaussian_mi, gaussian_pair, sample_gaussian
from mipp.zoo.training import seeded

F64 = torch.float64


# ----------------------------------------------------------------------------- reference


def block_distances(a: np.ndarray, norm: str) -> np.ndarray:
    """Distances ``(n, n)`` between the rows of ``a`` ``(n, d)`` from explicit differences:
    Euclidean, divided by √(non-constant columns) for ``"rms"``."""
    diff = a[:, None, :] - a[None, :, :]
    d = np.sqrt((diff**2).sum(-1))
    live = int((np.ptp(a, axis=0) > 0).sum())
    return d / math.sqrt(live) if norm == "rms" else d


def knn_counts(dists: list[np.ndarray], marginals: list[np.ndarray], k: int) -> list[np.ndarray]:
    """ε_j from the max of ``dists`` (self excluded); per marginal, samples m ≠ j with
    distance < ε_j."""
    joint = np.maximum.reduce(dists).copy()
    np.fill_diagonal(joint, np.inf)
    eps = np.sort(joint, axis=1)[:, k - 1]
    counts = []
    for d in marginals:
        d = d.copy()
        np.fill_diagonal(d, np.inf)
        counts.append((d < eps[:, None]).sum(1))
    return counts


def ref_ksg_terms(dx: np.ndarray, dy: np.ndarray, k: int) -> np.ndarray:
    """KSG algorithm 1 per-sample terms ψ(k) + ψ(n) − ψ(n_x + 1) − ψ(n_y + 1)."""
    psi = scipy.special.digamma
    n_x, n_y = knn_counts([dx, dy], [dx, dy], k)
    return psi(k) + psi(len(dx)) - psi(n_x + 1) - psi(n_y + 1)


def ref_delta_terms(data: KSGData, cols: list[int], units: list[int], i: int, k: int, norm: str):
    """Frenzel–Pompe terms for unit i given the other units of ``units`` (the kept set), every
    block distance computed from scratch; plain KSG when the others hold no live feature."""
    x = data.x.numpy()
    y = data.y[:, cols].numpy()
    dx = block_distances(x[:, i, :], norm)
    dy = block_distances(y, norm)
    others = [u for u in units if u != i]
    z = x[:, others, :].reshape(len(x), -1)
    if z.shape[1] == 0 or not (np.ptp(z, axis=0) > 0).any():
        return ref_ksg_terms(dx, dy, k)
    dz = block_distances(z, norm)
    psi = scipy.special.digamma
    n_xz, n_yz, n_z = knn_counts([dx, dz, dy], [np.maximum(dx, dz), np.maximum(dy, dz), dz], k)
    return psi(k) - psi(n_xz + 1) - psi(n_yz + 1) + psi(n_z + 1)


def ref_information(data: KSGData, cols: list[int], units: list[int], k: int, norm: str):
    x = data.x.numpy()[:, units, :].reshape(len(data.x), -1)
    return ref_ksg_terms(
        block_distances(x, norm), block_distances(data.y[:, cols].numpy(), norm), k
    )


def layer(n: int = 300, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x ``(n, 5, 2)``: correlated units; unit 2 has a constant feature, unit 3 is ReLU'd
    (ties at 0), unit 4 is dead. y ``(n, 4)`` nonlinear in x, column 3 constant."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g, dtype=F64)
    x = base @ (torch.eye(10, dtype=F64) + 0.3 * torch.randn(10, 10, generator=g, dtype=F64))
    x = x.view(n, 5, 2).clone()
    x[:, 2, 1] = 7.0
    x[:, 3] = torch.relu(x[:, 3])
    x[:, 4] = -2.0
    noise = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.stack(
        [
            x[:, 0, 0] + torch.sin(2 * x[:, 1, 1]) + 0.5 * noise[:, 0],
            x[:, 2, 0] ** 2 + 0.5 * noise[:, 1],
            x[:, 3].sum(1) + x[:, 1, 0] + 0.5 * noise[:, 2],
            torch.full((n,), 3.0, dtype=F64),
        ],
        dim=1,
    )
    return x, y


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("norm", ["rms", "euclidean"])
def test_delta_from_cache_equals_direct_recomputation(norm: str) -> None:
    x, y = layer()
    k = 3
    est = KSGEstimator(k=k, block_norm=norm, chunk_rows=64)  # 300 rows: a partial last chunk
    data = est.prepare(x, y)
    cols = [0, 1, 2]
    state = est.start(data, torch.tensor([0, 1, 2, 3]))  # column 3 is constant: dropped
    assert state.columns.tolist() == cols
    units = [0, 1, 2, 3, 4]

    def check(checked: list[int]) -> None:
        for i in checked:
            d = state.delta(i)
            if i == 4:  # dead unit: no computation
                assert (d.value, d.relative, d.pvalue) == (0.0, 0.0, 1.0)
                continue
            phi = ref_delta_terms(data, cols, units, i, k, norm)
            assert d.value == pytest.approx(max(phi.mean(), 0.0), abs=1e-12)
            p_ref = scipy.stats.ttest_1samp(phi, 0.0, alternative="greater").pvalue
            assert d.pvalue == pytest.approx(p_ref, rel=1e-9, abs=1e-300)
            info = max(ref_information(data, cols, units, k, norm).mean(), 0.0)
            assert d.relative == pytest.approx(d.value / info, rel=1e-9)

    check(units)
    assert state.delta(0).value > 0.05 and state.delta(2).value > 0.05  # non-trivial cases
    for i in (1, 0):
        state.remove(i)
        units.remove(i)
    check(units)  # S = {2, 3, 4}: D²_S after two downdates
    state.remove(3)
    units.remove(3)
    check(units)  # S = {2, 4}: 4 is dead, so Z is empty and Δ_2 = I(X_2; Y) by plain KSG
    assert state.active.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("norm", ["rms", "euclidean"])
def test_single_scores_and_information_equal_direct_recomputation(norm: str) -> None:
    x, y = layer(seed=1)
    est = KSGEstimator(k=4, block_norm=norm, chunk_rows=128)
    data = est.prepare(x, y)
    cols = [0, 2]
    state = est.start(data, torch.tensor(cols))
    scores = state.single_scores()
    assert scores.dtype == F64 and scores[4] == 0.0
    for u in range(4):
        ref = ref_ksg_terms(
            block_distances(data.x[:, u, :].numpy(), norm),
            block_distances(data.y[:, cols].numpy(), norm),
            4,
        )
        assert float(scores[u]) == pytest.approx(max(ref.mean(), 0.0), abs=1e-12)
    units = [0, 1, 2, 3, 4]
    assert state.information() == pytest.approx(
        max(ref_information(data, cols, units, 4, norm).mean(), 0.0), abs=1e-12
    )
    assert state.information() > 0.3
    for i in (3, 0):
        state.remove(i)
        units.remove(i)
        assert state.information() == pytest.approx(
            max(ref_information(data, cols, units, 4, norm).mean(), 0.0), abs=1e-12
        )


def test_cache_is_shared_by_starts_and_never_modified() -> None:
    x, y = layer(seed=2)
    est = KSGEstimator()
    data = est.prepare(x, y)
    first = est.start(data)
    before = [first.delta(i).value for i in range(4)]
    scores, info = first.single_scores(), first.information()
    d2x = data._d2x
    first.remove(0)
    first.remove(1)
    again = est.start(data)  # what a bisection pass does
    assert data._d2x is d2x  # the all-units distances are computed once
    assert [again.delta(i).value for i in range(4)] == before
    assert torch.equal(again.single_scores(), scores) and again.information() == info
    # results do not depend on the chunking
    other = KSGEstimator(chunk_rows=7).start(KSGEstimator(chunk_rows=7).prepare(x, y))
    assert [other.delta(i).value for i in range(4)] == pytest.approx(before, abs=1e-12)


# ----------------------------------------------------------------------------- known answers


def test_mi_of_gaussian_pair_matches_closed_form() -> None:
    # Measured over seeds 0-5 at n = 2000 (1-D, ρ = 0.8): errors of the single score, I(X; Y)
    # (2-D X) and Δ_0 within -0.02 .. +0.05 nats; tolerance 0.06.
    pair = gaussian_pair(2000, dim_x=2, dim_y=1, rho=0.8, seed=0)  # x[:, 1] is noise
    est = KSGEstimator()
    state = est.start(est.prepare(pair.x, pair.y))
    assert pair.mi == pytest.approx(0.5108, abs=1e-4)
    assert abs(float(state.single_scores()[0]) - pair.mi) < 0.06
    assert abs(state.information() - pair.mi) < 0.06
    assert abs(state.delta(0).value - pair.mi) < 0.06  # I(X_0; Y | X_1) = I(X_0; Y)
    assert state.delta(1).value < 0.02


def gaussian_cmi_layer(n: int, b: int, seed: int) -> tuple[Tensor, Tensor, float]:
    """Units X (b features), Z1, Z2 (b each) and Y (b columns), jointly Gaussian:
    X = 0.6 Z1 + 0.8 e, Y = 0.5 X + 0.5 Z1 + 0.5 Z2 + 0.6 e' per coordinate.
    Returns x ``(n, 3, b)``, y ``(n, b)`` and the closed-form I(X; Y | Z1, Z2) in nats."""
    # a linear map of independent standard normals [Z1, Z2, e, e'] → [X, Z1, Z2, Y]
    eye = torch.eye(b, dtype=F64)
    zero = torch.zeros(b, b, dtype=F64)
    mix = torch.cat(
        [
            torch.cat([0.6 * eye, zero, 0.8 * eye, zero], 1),
            torch.cat([eye, zero, zero, zero], 1),
            torch.cat([zero, eye, zero, zero], 1),
            torch.cat([0.8 * eye, 0.5 * eye, 0.4 * eye, 0.6 * eye], 1),  # 0.5 X + 0.5 Z1 + ...
        ],
        0,
    )
    cov = mix @ mix.T
    cmi = gaussian_mi(cov, b) - gaussian_mi(cov[: 3 * b, : 3 * b], b)
    s = sample_gaussian(cov, n, seed=seed)
    return s[:, : 3 * b].reshape(n, 3, b), s[:, 3 * b :], cmi


@pytest.mark.parametrize(
    ("n", "b", "low", "high"),
    [
        # Measured errors over seeds 0-7 (CMI 0.184 nats): -0.04 .. +0.014 with 1-D blocks
        # (a 4-D joint space) at n = 2000.
        (2000, 1, -0.06, 0.04),
        # With 2-D blocks (an 8-D joint space) KSG underestimates, as it does in higher
        # dimensions: errors -0.11 .. -0.05 (CMI 0.368) at n = 1000 (-0.07 .. -0.04 at 2000;
        # with block_norm="euclidean" -0.17 .. -0.13).
        (1000, 2, -0.15, 0.0),
    ],
)
def test_conditional_mi_of_gaussians_matches_closed_form(
    n: int, b: int, low: float, high: float
) -> None:
    x, y, cmi = gaussian_cmi_layer(n, b, seed=3)
    est = KSGEstimator()
    state = est.start(est.prepare(x, y))
    assert cmi > 0.1
    d = state.delta(0)
    assert low < d.value - cmi < high
    assert d.pvalue < 1e-6


def test_independence_gives_zero_and_large_pvalues() -> None:
    # Measured over seeds 0-19 (n = 1000, 3 units, 2 columns): Δ <= 0.029, I(X; Y) <= 0.026,
    # s_i <= 0.035 nats; 4 of the 60 p-values < 0.05 (about the nominal rate), none < 0.01.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 3, generator=g, dtype=F64)
    y = torch.randn(1000, 2, generator=g, dtype=F64)
    est = KSGEstimator()
    state = est.start(est.prepare(x, y))
    assert state.information() < 0.04
    assert float(state.single_scores().max()) < 0.04
    for i in range(3):
        d = state.delta(i)
        assert d.value < 0.04
        assert d.pvalue > 0.05  # this seed: 0.79, 0.094, 0.78


def test_finds_a_unit_needed_only_through_its_square_where_linear_does_not() -> None:
    g = torch.Generator().manual_seed(0)
    n = 1000
    # unit 0 matters through y0 = x0² only, unit 1 through y1 = x1; unit 2 is noise
    x = torch.randn(n, 3, generator=g, dtype=F64)
    noise = 0.3 * torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.stack([x[:, 0] ** 2, x[:, 1]], 1) + noise
    ksg = KSGEstimator()
    state = ksg.start(ksg.prepare(x, y))
    d0 = state.delta(0)
    assert d0.value > 0.3 and d0.pvalue < 1e-10  # measured 0.70-0.75 nats over seeds 0-4
    assert state.delta(2).value < 0.02
    linear = LinearEstimator()
    lin_state = linear.start(linear.prepare(x, y))
    assert lin_state.delta(0).value < 0.01  # share of variance; x0 and x0² are uncorrelated
    assert lin_state.delta(1).value > 0.4


@pytest.mark.parametrize("norm", ["rms", "euclidean"])
def test_a_duplicate_adds_nothing_until_its_copy_is_removed(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 3, generator=g, dtype=F64)
    x = torch.cat([z, z[:, :1]], 1)  # unit 3 copies unit 0
    y = z @ torch.tensor([[1.0], [1.0], [0.5]], dtype=F64)
    y = y + 0.5 * torch.randn(1000, 1, generator=g, dtype=F64)
    est = KSGEstimator(block_norm=norm)
    state = est.start(est.prepare(x, y))
    for unit in (0, 3):
        d = state.delta(unit)
        assert d.value == 0.0 and d.pvalue > 0.5  # measured 0 for seeds 0-4, both norms
    state.remove(3)
    d = state.delta(0)
    assert d.value > 0.5 and d.pvalue < 1e-10  # measured 0.66-0.74 nats


def test_nearly_invariant_under_monotone_maps_and_exactly_under_affine_ones() -> None:
    # MI is invariant under per-coordinate monotone maps; KSG only nearly (its distances move).
    # Measured over seeds 0-5 at n = 2000 (exp and cube): the 1-D single score moves by
    # <= 0.05 nats, Δ_0 (conditioning on a second coordinate) by <= 0.078 nats.
    pair = gaussian_pair(2000, dim_x=2, dim_y=1, rho=0.8, seed=0)
    est = KSGEstimator()

    def estimates(x: Tensor) -> tuple[float, float]:
        state = est.start(est.prepare(x, pair.y))
        return float(state.single_scores()[0]), state.delta(0).value

    score, delta = estimates(pair.x)
    for f in (torch.exp, lambda t: t**3):
        score_f, delta_f = estimates(f(pair.x))
        assert abs(score_f - score) < 0.06
        assert abs(delta_f - delta) < 0.09
    score_a, delta_a = estimates(3.0 * pair.x + torch.tensor([1.0, -5.0], dtype=F64))
    assert score_a == pytest.approx(score, abs=1e-12) and delta_a == pytest.approx(delta, abs=1e-12)


# ----------------------------------------------------------------------------- options, edges


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("k", 0),
        ("k", 2.5),
        ("k", True),
        ("jitter", -1e-6),
        ("jitter", math.nan),
        ("chunk_rows", 0),
        ("block_norm", "manhattan"),
        ("seed", 1.5),
    ],
)
def test_bad_options_raise_naming_the_value(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{option}.*{re.escape(repr(value))}"):
        KSGEstimator(**{option: value})


def test_too_few_samples_and_foreign_prepared_raise() -> None:
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"k=4.*got 5"):
        KSGEstimator().prepare(x, x[:, 0])
    with pytest.raises(TypeError, match="prepare"):
        KSGEstimator().start(LinearEstimator().prepare(x, x[:, 0]))


def test_constant_unit_scores_zero_and_registry_passes_the_seed() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=F64)
    x[:, 1] = 4.0
    y = x[:, :1] + 0.1 * torch.randn(200, 1, generator=g, dtype=F64)
    est = make_estimator("ksg", seed=3)
    assert isinstance(est, KSGEstimator) and est.seed == 3
    assert repr(est) == (
        "KSGEstimator(k=4, jitter=1e-06, block_norm='rms', chunk_rows=256, seed=3)"
    )
    data = est.prepare(x, y)
    assert data.unit_dims.tolist() == [1, 0, 1] and bool((data.x[:, 1] == 0).all())
    assert torch.allclose(data.x[:, [0, 2]].std(0, correction=0), torch.ones(2, 1, dtype=F64))
    state = est.start(data)
    assert float(state.single_scores()[1]) == 0.0
    assert state.delta(1) == mipp.estimators.Delta(value=0.0, relative=0.0, pvalue=1.0)
    state.remove(1)  # removing a dead unit changes nothing
    assert state.delta(0).value == pytest.approx(est.start(data).delta(0).value, abs=1e-12)
    # a constant target carries nothing
    flat = est.start(est.prepare(x, torch.ones(200)))
    assert flat.columns.numel() == 0 and flat.information() == 0.0
    assert flat.delta(0).value == 0.0 and float(flat.single_scores().sum()) == 0.0


# ----------------------------------------------------------------------------- pipeline


def lenet_and_inputs() -> tuple[torch.nn.Module, Tensor]:
    with seeded(0):
        net = mipp.create_model("lenet5", in_channels=1, input_size=28)
    return net, torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_pipeline_threshold_mode_removes_exactly_the_non_positive_units() -> None:
    net, x = lenet_and_inputs()
    result = mipp.prune(net, x, method=mipp.MIPP(threshold=0.0, estimator="ksg"), calib_samples=256)
    report = result.report
    assert report.options["estimator"] == "ksg"
    for g in report.groups:
        rel = torch.tensor(g.relative_deltas, dtype=F64)
        kept = torch.zeros(g.width_before, dtype=torch.bool)
        kept[torch.tensor(g.kept, dtype=torch.long)] = True
        tested = ~rel.isnan()
        assert bool((rel[tested & ~kept] == 0).all()) and bool((rel[tested & kept] > 0).all())
    assert result.model(x[:2]).shape == (2, 10)


@pytest.mark.slow
def test_pipeline_reaches_the_requested_sparsity() -> None:
    net, x = lenet_and_inputs()
    result = mipp.prune(net, x, method=mipp.MIPP(estimator="ksg"), sparsity=0.5, calib_samples=256)
    assert abs(result.report.achieved["units"] - 0.5) <= 0.01
    assert result.report.options["estimator"] == "ksg"


def test_a_positive_delta_over_a_clamped_zero_information_is_not_zero() -> None:
    """I(X_S; Y) is clamped at 0; a unit with Δ > 0 must then count as informative (relative
    +inf), not as adding nothing (relative 0), or threshold 0 would cut the layer to min_keep."""
    pair = gaussian_pair(600, dim_x=2, dim_y=1, rho=0.8, seed=0)
    est = KSGEstimator()
    state = est.start(est.prepare(pair.x, pair.y))
    state._info = 0.0  # what a clamped estimate of I(X_S; Y) leaves in the state
    d = state.delta(0)
    assert d.value > 0.1 and d.relative == math.inf
    state._info = 0.0
    kept = mipp.methods.selection.terc(state, threshold=0.0).support
    assert bool(kept[0])  # the informative unit survives a zero threshold
