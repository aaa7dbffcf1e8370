"""Tests for mipp.estimators: closed forms against direct refits / log-dets, test calibration
under H0, dead units, and the trained-MLP estimator on easy problems."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import Tensor

from mipp.errors import UnknownNameError
from mipp.estimators import (
    ESTIMATORS,
    Delta,
    Estimator,
    EstimatorState,
    GaussianEstimator,
    LinearEstimator,
    MLPEstimator,
    make_estimator,
    second_moments,
)
from mipp.estimators.base import check_pair
from mipp.zoo.data import gaussian_pair

F64 = torch.float64


def layer_data(
    *, n: int = 500, units: int = 7, b: int = 3, q: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Correlated multi-feature units x (n, U, b) and y = x W + noise (n, q)."""
    g = torch.Generator().manual_seed(seed)
    d = units * b
    mix = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d) + torch.eye(d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix
    w = torch.randn(d, q, generator=g, dtype=F64)
    y = x @ w + 3 * torch.randn(n, q, generator=g, dtype=F64)
    return (3 * x + 1).view(n, units, b), 5 * y - 2


def centred(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """Centred features (n, D) with constant ones exactly 0, standardised y (n, q), and b."""
    n, _, b = x.shape
    xc = (x - x.mean(0)).reshape(n, -1)
    xc[:, (x.reshape(n, -1).amax(0) == x.reshape(n, -1).amin(0))] = 0.0
    ys = (y - y.mean(0)) / y.std(0, correction=0)
    return xc, ys, b


def features(units: list[int], b: int) -> Tensor:
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(u * b, (u + 1) * b) for u in units])


def relative_ridge(xc: Tensor, ridge: float) -> float:
    var = (xc**2).mean(0)
    return ridge * float(var[var > 0].mean())


def ridge_fit(xc: Tensor, ys: Tensor, units: list[int], b: int, lam: float) -> tuple[float, float]:
    """Solve the ridge system on those units' features; (penalised MSE, plain MSE) / q."""
    n, q = ys.shape
    f = features(units, b)
    if f.numel() == 0:
        return 1.0, 1.0
    xs = xc[:, f]
    a = xs.T @ xs / n + lam * torch.eye(f.numel(), dtype=F64)
    w = torch.linalg.solve(a, xs.T @ ys / n)
    mse = float(((ys - xs @ w) ** 2).sum() / n / q)
    return mse + lam * float((w**2).sum()) / q, mse


def ridge_loss(xc: Tensor, ys: Tensor, units: list[int], b: int, lam: float) -> float:
    return ridge_fit(xc, ys, units, b, lam)[0]


def residual_logdet(
    xc: Tensor, ys: Tensor, units: list[int], b: int, lam_x: float, lam_y: float
) -> float:
    """log det of Cov(Y − X_S W) + λ_y I for the ridge fit W of Y on those units."""
    n, q = ys.shape
    f = features(units, b)
    resid = ys
    if f.numel():
        xs = xc[:, f]
        w = torch.linalg.solve(
            xs.T @ xs / n + lam_x * torch.eye(f.numel(), dtype=F64), xs.T @ ys / n
        )
        resid = ys - xs @ w
    return float(torch.logdet(resid.T @ resid / n + lam_y * torch.eye(q, dtype=F64)))


def ridged_joint(xc: Tensor, ys: Tensor, lam_x: float, lam_y: float) -> Tensor:
    n, d = xc.shape
    z = torch.cat([xc, ys], 1)
    c = z.T @ z / n
    c.diagonal()[:d] += lam_x
    c.diagonal()[d:] += lam_y
    return c


def logdet(c: Tensor, idx: Tensor) -> float:
    return 0.0 if idx.numel() == 0 else float(torch.logdet(c[idx][:, idx]))


def direct_cmi(c: Tensor, d: int, i: list[int], rest: list[int], b: int) -> float:
    """I(X_i; Y | X_rest) = ½[log|C_iR| + log|C_yR| − log|C_R| − log|C_iyR|] in nats."""
    fi, fr = features(i, b), features(rest, b)
    fy = torch.arange(d, c.shape[0])
    return 0.5 * (
        logdet(c, torch.cat([fi, fr]))
        + logdet(c, torch.cat([fy, fr]))
        - logdet(c, fr)
        - logdet(c, torch.cat([fi, fy, fr]))
    )


# --- linear -----------------------------------------------------------------------------------


def test_linear_deltas_equal_explicit_refits_through_downdates() -> None:
    x, y = layer_data()
    xc, ys, b = centred(x, y)
    est = LinearEstimator(ridge=1e-3)
    state = est.start(est.prepare(x, y))
    lam = relative_ridge(xc, 1e-3)
    assert state.ridge == pytest.approx(lam, rel=1e-12)
    kept = list(range(7))
    for removed in (None, 3, 0, 5):  # start, then three successive downdates
        if removed is not None:
            state.remove(removed)
            kept.remove(removed)
        assert state.active.tolist() == [u in kept for u in range(7)]
        loss = ridge_loss(xc, ys, kept, b, lam)
        assert state.information() == pytest.approx(1 - loss, abs=1e-9)
        mse = ridge_fit(xc, ys, kept, b, lam)[1]
        dof = 500 - b * len(kept) - 1
        for i in kept:
            loss_without, mse_without = ridge_fit(xc, ys, [u for u in kept if u != i], b, lam)
            d = state.delta(i)
            assert d.value == pytest.approx(loss_without - loss, abs=1e-9)
            assert d.relative == d.value
            # partial F-test on the plain residuals of the ridge fits, (b·q, q·dof) dof
            f_stat = ((mse_without - mse) / b) / (mse / dof)
            expected = scipy.stats.f.sf(f_stat, b * 4, 4 * dof)
            assert d.pvalue == pytest.approx(expected, rel=1e-6, abs=1e-300)


def test_linear_single_scores_equal_single_unit_refits() -> None:
    x, y = layer_data(seed=1)
    xc, ys, b = centred(x, y)
    est = LinearEstimator()
    scores = est.start(est.prepare(x, y)).single_scores()
    lam = relative_ridge(xc, 1e-3)
    expected = torch.tensor([1 - ridge_loss(xc, ys, [u], b, lam) for u in range(7)], dtype=F64)
    assert scores.dtype == F64
    torch.testing.assert_close(scores, expected, atol=1e-10, rtol=0)


def test_linear_is_scale_free() -> None:
    """The relative ridge makes every quantity invariant to rescaling x and y."""
    x, y = layer_data(seed=2)
    est = LinearEstimator()
    a, b = est.start(est.prepare(x, y)), est.start(est.prepare(1e3 * x, -1e-2 * y))
    assert a.information() == pytest.approx(b.information(), rel=1e-9)
    assert a.delta(4).value == pytest.approx(b.delta(4).value, rel=1e-7)
    torch.testing.assert_close(a.single_scores(), b.single_scores(), rtol=1e-7, atol=1e-12)


def test_linear_f_test_calibrated_under_h0() -> None:
    """y independent of x: the F-test p-values are uniform (fraction below 0.05 ≈ 0.05)."""
    pvalues, stats = [], []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(60, 3, 2, generator=g, dtype=F64)
        y = torch.randn(60, 3, generator=g, dtype=F64)
        d = LinearEstimator().start(LinearEstimator().prepare(x, y)).delta(0)
        pvalues.append(d.pvalue)
        stats.append(d.value)
    frac = sum(p < 0.05 for p in pvalues) / len(pvalues)
    assert 0.02 <= frac <= 0.09
    assert 0.3 <= sum(p < 0.5 for p in pvalues) / len(pvalues) <= 0.7


def test_linear_test_ignores_the_ridge_penalty_on_exact_duplicates() -> None:
    """An exact copy adds nothing; the penalty alone gives it Δ ≈ λ‖w‖²/2q > 0, which must not
    read as significant even when the target is almost noiseless. (Only the O(λ²) shrinkage
    difference is left: with noise below ~λ² of the variance a copy tests significant again.)"""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2000, 3, generator=g, dtype=F64)
    x = torch.cat([z, z[:, :1]], 1)
    y = z @ torch.randn(3, 2, generator=g, dtype=F64)
    y = y + 0.05 * torch.randn(2000, 2, generator=g, dtype=F64)  # ~1e-3 of the variance
    state = LinearEstimator().start(LinearEstimator().prepare(x, y))
    dup, needed = state.delta(0), state.delta(1)
    assert 0 < dup.value < 1e-3 and dup.pvalue > 0.5
    assert needed.value > 0.05 and needed.pvalue < 1e-12


def test_gaussian_test_ignores_the_ridge_on_exact_duplicates() -> None:
    """The ridge acts like noise on each feature, so an exact copy has Δ > 0 in nats; the test
    must still find it insignificant when the target is almost noiseless."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2000, 3, generator=g, dtype=F64)
    x = torch.cat([z, z[:, :1]], 1)
    y = z @ torch.randn(3, 2, generator=g, dtype=F64)
    y = y + 0.05 * torch.randn(2000, 2, generator=g, dtype=F64)
    state = GaussianEstimator().start(GaussianEstimator().prepare(x, y))
    dup, needed = state.delta(0), state.delta(1)
    assert dup.value > 1e-3 and 2 * 2000 * dup.value > 20  # the plain 2nΔ would reject H0
    assert dup.pvalue > 0.5
    assert needed.pvalue < 1e-12


def test_linear_f_test_needs_more_samples_than_features() -> None:
    """D = 21 features, 20 samples: Δ_i still comes from the ridge (threshold and target
    modes), the F-test has no residual degrees of freedom, so the p-value is NaN and the
    estimator asks for D + 2 samples when a test is wanted."""
    x, y = layer_data(n=20, units=7, b=3)
    state = LinearEstimator().start(LinearEstimator().prepare(x, y))
    d = state.delta(0)
    assert math.isfinite(d.value) and math.isnan(d.pvalue)
    assert LinearEstimator().min_samples(21, 2) == 23
    assert LinearEstimator().min_samples(21, 2, test=False) == 2


def test_linear_delta_rejects_removed_unit() -> None:
    state = LinearEstimator().start(LinearEstimator().prepare(*layer_data()))
    state.remove(2)
    with pytest.raises(ValueError, match="unit 2 is not in the kept set"):
        state.delta(2)
    with pytest.raises(ValueError, match="got 9"):
        state.remove(9)


# --- gaussian ---------------------------------------------------------------------------------


def test_gaussian_deltas_equal_direct_logdets_through_downdates() -> None:
    x, y = layer_data(seed=3, q=3)
    xc, ys, b = centred(x, y)
    ridge = 1e-3
    est = GaussianEstimator(ridge=ridge)
    state = est.start(est.prepare(x, y))
    lam_x = relative_ridge(xc, ridge)
    c = ridged_joint(xc, ys, lam_x, ridge)
    d = xc.shape[1]
    kept = list(range(7))
    for removed in (None, 6, 1, 2, 4):
        if removed is not None:
            state.remove(removed)
            kept.remove(removed)
        info = direct_cmi(c, d, kept, [], b)  # I(X_S; Y)
        assert state.information() == pytest.approx(info, abs=1e-9)
        logdet_r = residual_logdet(xc, ys, kept, b, lam_x, ridge)
        for i in kept:
            rest = [u for u in kept if u != i]
            expected = direct_cmi(c, d, [i], rest, b)
            delta = state.delta(i)
            assert delta.value == pytest.approx(expected, abs=1e-9)
            assert delta.relative == pytest.approx(expected / info, abs=1e-9)
            # likelihood ratio on the plain residual covariances of explicit ridge fits
            stat = 500 * (residual_logdet(xc, ys, rest, b, lam_x, ridge) - logdet_r)
            expected_p = scipy.stats.chi2.sf(stat, b * 3)
            assert delta.pvalue == pytest.approx(expected_p, rel=1e-6, abs=1e-300)
    singles = state.single_scores()
    expected = torch.tensor([direct_cmi(c, d, [u], [], b) for u in range(7)], dtype=F64)
    torch.testing.assert_close(singles, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("b", [1, 3])
def test_gaussian_information_matches_closed_form_mi(b: int) -> None:
    pair = gaussian_pair(20000, dim_x=3, dim_y=2, rho=0.6, seed=4)
    x = pair.x.view(-1, 3 // b, b)  # three 1-feature units, or one 3-feature unit
    est = GaussianEstimator(ridge=1e-8)
    info = est.start(est.prepare(x, pair.y)).information()
    assert info == pytest.approx(pair.mi, rel=0.03)  # 0.446 nats


def test_gaussian_chi2_test_calibrated_under_h0() -> None:
    """Under independence 2nΔ ~ χ²(b·q): p uniform and E[2nΔ] ≈ b·q (the bias of Δ)."""
    n, b, q = 300, 2, 2
    pvalues, stats = [], []
    for seed in range(200):
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(n, 3, b, generator=g, dtype=F64)
        y = torch.randn(n, q, generator=g, dtype=F64)
        est = GaussianEstimator(ridge=1e-6)
        d = est.start(est.prepare(x, y)).delta(1)
        pvalues.append(d.pvalue)
        stats.append(2 * n * d.value)
    frac = sum(p < 0.05 for p in pvalues) / len(pvalues)
    assert 0.02 <= frac <= 0.09
    assert sum(stats) / len(stats) == pytest.approx(b * q, rel=0.2)
    assert max(stats) / (2 * n) < 0.05  # Δ is small: at most a few hundredths of a nat


# --- shared behaviour of the closed forms ------------------------------------------------------


@pytest.mark.parametrize("cls", [LinearEstimator, GaussianEstimator])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.0])
def test_constant_units_score_exactly_zero(cls: type, value: float) -> None:
    x, y = layer_data(seed=5)
    x[:, 2] = value  # a dead unit (values whose mean does not round-trip exactly)
    x[:, 4, 1] = 7.0  # a unit with one dead feature out of three
    est = cls()
    state = est.start(est.prepare(x, y))
    scores = state.single_scores()
    assert scores[2].item() == 0.0
    assert torch.isfinite(scores).all() and (scores[[0, 1, 3, 4, 5, 6]] > 0).all()
    assert state.delta(2) == Delta(value=0.0, relative=0.0, pvalue=1.0)
    state.remove(0)
    assert state.delta(2) == Delta(value=0.0, relative=0.0, pvalue=1.0)
    deltas = [state.delta(i) for i in (1, 3, 4, 5, 6)]
    assert all(math.isfinite(d.value) and d.value > 0 for d in deltas)
    # the dead unit changes nothing: same answers as without it
    keep = [0, 1, 3, 4, 5, 6]
    other = est.start(est.prepare(x[:, keep], y))
    other.remove(0)
    assert other.information() == pytest.approx(state.information(), rel=1e-9)
    assert other.delta(2).value == pytest.approx(state.delta(3).value, rel=1e-7)


@pytest.mark.parametrize("cls", [LinearEstimator, GaussianEstimator])
def test_zero_variance_target_columns_are_dropped(cls: type) -> None:
    x, y = layer_data(seed=6)
    y_const = torch.cat([y[:, :2], torch.full((y.shape[0], 1), 0.3, dtype=F64), y[:, 2:]], 1)
    est = cls()
    prepared = est.prepare(x, y_const)
    state = est.start(prepared)
    assert state.columns.tolist() == [0, 1, 3, 4]
    reference = est.start(est.prepare(x, y))
    assert state.information() == pytest.approx(reference.information(), rel=1e-9)
    assert state.delta(3).value == pytest.approx(reference.delta(3).value, rel=1e-7)
    # a subset of columns equals a fresh estimate on those columns
    sub = est.start(prepared, torch.tensor([4, 0]))
    direct = est.start(est.prepare(x, y[:, [3, 0]]))
    assert sub.delta(1).value == pytest.approx(direct.delta(1).value, rel=1e-7)
    # only constant columns: nothing to explain
    empty = est.start(prepared, torch.tensor([2]))
    assert empty.information() == 0.0
    assert empty.delta(0) == Delta(value=0.0, relative=0.0, pvalue=1.0)
    assert (empty.single_scores() == 0).all()


def test_second_moments_match_population_covariance_across_chunks() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20000, 2, 2, generator=g) * 3 + 5  # float32, more rows than one chunk
    y = torch.randn(20000, 3, generator=g) - 1
    m = second_moments(x, y)
    z = torch.cat([x.reshape(20000, 4), y], 1).double()
    cov = torch.cov(z.T, correction=0)
    torch.testing.assert_close(m.sxx, cov[:4, :4], atol=1e-9, rtol=0)
    torch.testing.assert_close(m.sxy, cov[:4, 4:], atol=1e-9, rtol=0)
    torch.testing.assert_close(m.syy, cov[4:, 4:], atol=1e-9, rtol=0)
    assert (m.n, m.n_units, m.unit_size) == (20000, 2, 2)


def test_check_pair_rejects_bad_inputs() -> None:
    x, y = torch.zeros(10, 3), torch.zeros(10, 2)
    with pytest.raises(ValueError, match="same number of samples, got 10 and 9"):
        check_pair(x, y[:9])
    bad = x.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        check_pair(bad, y)
    with pytest.raises(ValueError, match=r"got shape \(10, 3, 1, 1\)"):
        check_pair(x.view(10, 3, 1, 1), y)


def test_registry() -> None:
    assert sorted(ESTIMATORS) == ["gaussian", "ksg", "linear", "mlp"]
    for name, cls in ESTIMATORS.items():
        est = make_estimator(name, seed=3)
        assert isinstance(est, cls) and isinstance(est, Estimator) and est.name == name
    assert make_estimator("mlp", seed=3).seed == 3 and make_estimator("ksg", seed=3).seed == 3
    with pytest.raises(UnknownNameError, match="valid estimators: gaussian, ksg, linear, mlp"):
        make_estimator("ksgg")
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0, got -1"):
        LinearEstimator(ridge=-1)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        MLPEstimator(repeats=0)


# --- mlp --------------------------------------------------------------------------------------

MLP_FAST = {"hidden": 16, "repeats": 4, "batch_size": None, "lr": 3e-2, "patience": 30}


def mlp_problem() -> tuple[Tensor, Tensor]:
    """Unit 0 drives y (nonlinearly), unit 1 is noise, unit 2 is dead, unit 3 a weak signal."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(800, 4, generator=g)
    x[:, 2] = 0.5
    y = torch.stack([torch.tanh(2 * x[:, 0]), x[:, 0] + 0.5 * x[:, 3]], 1)
    return x, y + 0.1 * torch.randn(800, 2, generator=g)


def test_mlp_detects_informative_and_noise_units() -> None:
    x, y = mlp_problem()
    est = MLPEstimator(**MLP_FAST, seed=0)
    state = est.start(est.prepare(x, y))
    assert isinstance(state, EstimatorState)
    scores = state.single_scores()
    assert scores[2].item() == 0.0
    assert scores[0] > 0.5 and scores[0] > scores[3] > 0.02 and abs(scores[1]) < 0.03
    info = state.information()
    assert 0.9 < info < 1.05  # y is nearly a function of x: most of the variance explained
    strong, noise = state.delta(0), state.delta(1)
    assert strong.value > 0.3 and strong.pvalue < 0.01
    assert abs(noise.value) < 0.02 and noise.pvalue > 0.05
    assert state.delta(2) == Delta(value=0.0, relative=0.0, pvalue=1.0)
    # removing the unit just tested adopts its masked fit: information drops by exactly Δ
    state.remove(1)
    assert state.information() == pytest.approx(info - noise.value, abs=1e-6)
    weak = state.delta(3)
    assert 0.01 < weak.value < strong.value and weak.pvalue < 0.05
    state.remove(2)
    assert state.active.tolist() == [True, False, False, True]
    assert state.delta(0).value > 0.3


@pytest.mark.slow
def test_mlp_is_deterministic_for_a_seed() -> None:
    x, y = mlp_problem()

    def run(seed: int) -> tuple[float, float, list[float]]:
        est = MLPEstimator(**MLP_FAST, seed=seed)
        state = est.start(est.prepare(x, y))
        return state.delta(3).value, state.information(), state.single_scores().tolist()

    first = run(0)
    assert run(0) == first
    assert run(1) != first


class _NoPrefetch(EstimatorState):
    """A linear state seen without its ``prefetch`` (the contract's no-op): TERC then takes
    the per-unit path."""

    def __init__(self, state):
        self._s = state
        self.n_units = state.n_units

    @property
    def active(self):
        return self._s.active

    def single_scores(self):
        return self._s.single_scores()

    def delta(self, i):
        return self._s.delta(i)

    def remove(self, i):
        self._s.remove(i)

    def information(self):
        return self._s.information()


def _redundant_layer(units: int, unit_size: int, *, seed: int):
    """3,000 samples of ``units`` noisy mixtures of 40 latents (many redundant units) and a
    12-column target read from the latents."""
    g = torch.Generator().manual_seed(seed)
    n = 3000
    z = torch.randn(n, 40, generator=g, dtype=torch.float64)
    x = (z @ torch.randn(40, units * unit_size, generator=g, dtype=torch.float64)).view(
        n, units, unit_size
    )
    x = x + 0.3 * torch.randn(n, units, unit_size, generator=g, dtype=torch.float64)
    y = z[:, :12] + 0.5 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("unit_size", [1, 3])
def test_linear_prefetched_blocks_equal_the_per_unit_path(unit_size):
    """Deferred block removals (prefetch) give the same Δs, p-values and support as removing
    one unit at a time, over more units than one block holds."""
    from mipp.methods.selection import terc

    units = 150
    x, y = _redundant_layer(units, unit_size, seed=5)
    est = LinearEstimator(ridge=0.0)  # so that a fresh fit on a subset uses the same ridge
    prepared = est.prepare(x, y)
    fast = terc(est.start(prepared), threshold=2e-4)
    slow = terc(_NoPrefetch(est.start(prepared)), threshold=2e-4)
    assert 20 < fast.n_kept < units - 20  # removals happen inside and across blocks
    assert torch.equal(fast.support, slow.support)
    assert torch.allclose(fast.deltas, slow.deltas, rtol=1e-8, atol=1e-12, equal_nan=True)
    assert torch.allclose(fast.pvalues, slow.pvalues, rtol=1e-6, atol=1e-12, equal_nan=True)
    assert fast.info_kept == pytest.approx(slow.info_kept, rel=1e-10)
    # the incrementally tracked I(X_S; Y) equals a fresh fit on the kept units alone
    fresh = est.start(est.prepare(x[:, fast.support], y))
    assert fast.info_kept == pytest.approx(fresh.information(), rel=1e-9)


@pytest.mark.parametrize("unit_size", [1, 3])
def test_gaussian_threshold_mode_blocks_equal_the_tested_path(unit_size):
    """Threshold mode (no p-values: block downdates of P and Q, I(X_S; Y) by the chain rule)
    removes the same units with the same Δs as the path that keeps the χ² test's terms, and
    the tracked I(X_S; Y) equals a fresh fit on the kept units; asking for p-values again
    afterwards gives the in-sample test of a fresh state."""
    from mipp.methods.selection import terc

    units = 150
    x, y = _redundant_layer(units, unit_size, seed=6)
    est = GaussianEstimator(ridge=0.0)
    prepared = est.prepare(x, y)
    fast_state = est.start(prepared)
    fast = terc(fast_state, threshold=1e-3)
    assert not fast_state.pvalues and torch.isnan(fast.pvalues).all()
    slow_state = est.start(prepared)  # terc sets the wrapper's pvalues, not this state's
    slow = terc(_NoPrefetch(slow_state), threshold=1e-3)
    assert slow_state.pvalues
    assert 20 < fast.n_kept < units - 20  # removals happen inside and across blocks
    assert torch.equal(fast.support, slow.support)
    assert torch.allclose(fast.deltas, slow.deltas, rtol=1e-8, atol=1e-12, equal_nan=True)
    assert fast.info_kept == pytest.approx(slow.info_kept, rel=1e-9)
    fresh = est.start(est.prepare(x[:, fast.support], y))
    assert fast.info_kept == pytest.approx(fresh.information(), rel=1e-9)
    # p-values asked for again: B, E and G rebuilt from P give the fresh state's χ² test
    fast_state.pvalues = True
    kept = fast.support.nonzero().flatten().tolist()
    for j, unit in enumerate(kept[:5]):
        assert fast_state.delta(unit).pvalue == pytest.approx(fresh.delta(j).pvalue, rel=1e-6)


@pytest.mark.parametrize("unit_size", [1, 3])
def test_linear_threshold_mode_skips_the_f_test_and_gives_it_back(unit_size):
    """``pvalues`` False (threshold mode): the same Δ_i and a NaN p-value, the same removals
    (inside and across blocks, whose F-test caches and ‖B‖² are then not kept); True again:
    the in-sample F-test of the tested path, also when switched inside a prefetched block."""
    from mipp.methods.selection import terc

    x, y = _redundant_layer(150, unit_size, seed=8)
    est = LinearEstimator()
    prepared = est.prepare(x, y)
    fast_state, slow_state = est.start(prepared), est.start(prepared)
    fast = terc(fast_state, threshold=2e-4)
    assert not fast_state.pvalues
    slow = terc(_NoPrefetch(slow_state), threshold=2e-4)
    assert 20 < fast.n_kept < 130  # removals inside and across blocks
    assert slow_state.pvalues and torch.equal(fast.support, slow.support)
    assert torch.allclose(fast.deltas, slow.deltas, rtol=1e-9, atol=1e-12, equal_nan=True)
    kept = fast.support.nonzero().flatten().tolist()
    assert math.isnan(fast_state.delta(kept[0]).pvalue)
    fast_state.pvalues = True
    for unit in kept[:5]:
        assert 0.0 <= slow_state.delta(unit).pvalue <= 1.0
        assert fast_state.delta(unit).value == pytest.approx(slow_state.delta(unit).value, rel=1e-9)
        assert fast_state.delta(unit).pvalue == pytest.approx(
            slow_state.delta(unit).pvalue, rel=1e-6
        )
    # switched inside a block prefetched without the test's caches
    inner, plain = est.start(prepared), est.start(prepared)
    inner.pvalues = False
    inner.prefetch(kept[:10])
    for unit in kept[:3]:
        inner.remove(unit)
        plain.remove(unit)
    inner.pvalues = True
    for unit in kept[3:8]:
        d, ref = inner.delta(unit), plain.delta(unit)
        assert d.value == pytest.approx(ref.value, rel=1e-9)
        assert d.pvalue == pytest.approx(ref.pvalue, rel=1e-6)


@pytest.mark.parametrize("unit_size", [1, 2])
def test_gaussian_deferred_removals_equal_in_place_downdates(unit_size):
    """Threshold mode never downdates the full P and Q: removals inside a prefetched block, a
    removal outside any block and a fork taken while removals are pending give every kept
    unit the Δ_i of the path that downdates in place after each removal (p-values on), and
    applying the pending removals gives its P and Q (1e-9)."""
    units = 40
    x, y = _redundant_layer(units, unit_size, seed=7)
    est = GaussianEstimator(ridge=1e-3)
    prepared = est.prepare(x, y)
    lazy, eager = est.start(prepared), est.start(prepared)
    lazy.pvalues, eager.pvalues = False, True

    def same(a, b) -> None:
        for u in a.active.nonzero().flatten().tolist():
            assert a.delta(u).value == pytest.approx(b.delta(u).value, rel=1e-9, abs=1e-12)
        assert a.information() == pytest.approx(b.information(), rel=1e-9)

    lazy.prefetch(list(range(10)))
    for u in (1, 4, 7, 30, 8, 22):  # 30 and 22: outside the block
        lazy.remove(u)
        eager.remove(u)
    same(lazy, eager)
    lazy.prefetch(list(range(10, 20)))
    twin, eager_twin = lazy.fork(), eager.fork()
    for u in (11, 12, 35):
        lazy.remove(u)
        eager.remove(u)
    same(lazy, eager)
    same(twin, eager_twin)  # the fork did not see the source's later removals
    for u in (13, 2):
        twin.remove(u)
        eager_twin.remove(u)
    same(twin, eager_twin)
    same(lazy, eager)
    assert lazy._deferred is not None  # the full matrices were never touched
    lazy._flush()
    for m_lazy, m_eager in ((lazy._p, eager._p), (lazy._qx, eager._qx)):
        assert torch.allclose(m_lazy, m_eager, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [LinearEstimator, GaussianEstimator])
@pytest.mark.parametrize("pvalues", [False, True])
def test_forked_state_selects_as_a_fresh_one_and_leaves_its_source_untouched(cls, pvalues):
    """A fork of an untouched state runs TERC to exactly the result of a freshly built state
    (both modes), and a selection on the fork changes nothing in the state it came from."""
    from mipp.methods.selection import terc

    x, y = _redundant_layer(60, 2, seed=7)
    est = cls()
    prepared = est.prepare(x, y)
    source = est.start(prepared)
    before = {k: v.clone() for k, v in vars(source).items() if isinstance(v, torch.Tensor)}
    options = {"confidence": 0.99} if pvalues else {"threshold": 2e-3}
    fresh = terc(est.start(prepared), **options)
    for _ in range(2):  # twice from the same source
        forked = terc(source.fork(), **options)
        assert 5 < forked.n_kept < 55
        assert torch.equal(forked.support, fresh.support)
        assert torch.equal(forked.deltas.nan_to_num(-1), fresh.deltas.nan_to_num(-1))
        assert torch.equal(forked.pvalues.nan_to_num(-1), fresh.pvalues.nan_to_num(-1))
    for k, v in before.items():
        assert torch.equal(getattr(source, k), v), k
    assert bool(source.active.all())


@pytest.mark.parametrize("cls", [LinearEstimator, GaussianEstimator])
@pytest.mark.parametrize("pvalues", [False, True])
def test_retargeted_state_selects_as_a_fresh_one_for_its_columns(cls, pvalues):
    """A state derived for other target columns (some dropped, some added, a constant one
    requested and left out; all replaced) gives the information, the TERC result and the
    p-values of a state built fresh for those columns, up to rounding; its source stays
    untouched."""
    from mipp.estimators.moments import ClosedFormState
    from mipp.methods.selection import terc

    x, y = _redundant_layer(30, 2, seed=3)
    y = torch.cat([y, torch.ones(len(y), 1, dtype=torch.float64)], 1)  # column 12: constant
    est = cls()
    prepared = est.prepare(x, y)
    source = est.start(prepared, torch.arange(0, 8))
    before = {k: v.clone() for k, v in vars(source).items() if isinstance(v, torch.Tensor)}
    options = {"confidence": 0.99} if pvalues else {"threshold": 2e-3}
    for columns in ([2, 3, 9, 10, 12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 11], [5], [9, 10, 11]):
        columns = torch.tensor(columns)
        derived = source.retargeted(prepared, columns)
        fresh = est.start(prepared, columns)
        assert sorted(derived.columns.tolist()) == sorted(fresh.columns.tolist())
        assert 12 not in derived.columns.tolist()
        assert derived.information() == pytest.approx(fresh.information(), rel=1e-9)
        a, b = terc(derived, **options), terc(fresh, **options)
        assert 0 < b.n_kept < 30  # some units removed
        assert torch.equal(a.support, b.support)
        assert torch.allclose(a.deltas, b.deltas, rtol=1e-8, atol=1e-12, equal_nan=True)
        assert torch.allclose(a.pvalues, b.pvalues, rtol=1e-6, atol=1e-12, equal_nan=True)
    for k, v in before.items():
        assert torch.equal(getattr(source, k), v), k
    # a state after removals, or one with a held-out test, cannot be retargeted
    source.remove(0)
    with pytest.raises(ValueError, match="starting state"):
        source.retargeted(prepared, torch.arange(4))
    assert not source.retarget_saves(prepared, torch.arange(4))
    assert isinstance(source, ClosedFormState)


def test_retarget_is_chosen_by_flop_count():
    """A handful of changed columns is cheaper derived than rebuilt; replacing every column
    of a wide target is not (Gaussian: a rank-q correction of the D×D inverse for the dropped
    columns costs more than factorising the small new conditional covariance)."""
    x, y = _redundant_layer(30, 2, seed=3)
    y = torch.cat([y, y, y, y], 1)  # 48 columns
    est = GaussianEstimator()
    prepared = est.prepare(x, y)
    source = est.start(prepared)
    assert source.retarget_saves(prepared, torch.arange(1, 48))
    assert not source.retarget_saves(prepared, torch.tensor([0]))
