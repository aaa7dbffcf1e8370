"""The held-out K-fold test of confidence mode (mipp.estimators.heldout, docs/METHOD.md §3):
fold moments, closed-form held-out losses against explicit refits, the ridge-penalty margin
on duplicates, the planted noise-free layer, and the wiring through MIPP and MIPPSelector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import mipp
from mipp.estimators import (
    GaussianEstimator,
    KSGEstimator,
    LinearEstimator,
    MLPEstimator,
    second_moments,
)
from mipp.estimators.heldout import HeldOutTest, one_sided_t_pvalue
from mipp.estimators.moments import DEFAULT_FOLDS, MomentAccumulator, fold_moments
from mipp.methods import MIPP
from mipp.methods import targets as targets_module
from mipp.methods.selection import MIPPSelector, terc
from mipp.zoo import models
from mipp.zoo.training import seeded

F64 = torch.float64
CLOSED_FORMS = [LinearEstimator, GaussianEstimator]


# --- the planted noise-free layer ---------------------------------------------------------------


def noise_free_layer(
    *, n: int = 3000, relu: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """64 units: 16 informative z, 16 exact copies of z, 16 dead (constant), 16 ignored
    (independent noise); y (n, 10) = z W or ReLU(z W) exactly, no noise. Columns shuffled.

    Returns ``x (n, 64)``, ``y``, ``role (64,)`` (0 informative, 1 copy, 2 dead, 3 ignored)
    and ``source (64,)`` (which z a unit of role 0 or 1 carries)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 16, generator=g, dtype=F64)
    ignored = torch.randn(n, 16, generator=g, dtype=F64)
    dead = torch.linspace(-1.0, 1.0, 16, dtype=F64).expand(n, 16)
    x = torch.cat([z, z, dead, ignored], 1)
    y = z @ (torch.randn(16, 10, generator=g, dtype=F64) / 4)
    if relu:
        y = torch.relu(y)
    perm = torch.randperm(64, generator=g)
    return x[:, perm].contiguous(), y, perm // 16, perm % 16


def assert_one_copy_each(support: Tensor, role: Tensor, source: Tensor) -> None:
    """Exactly one unit of each informative / copy pair kept; no dead or ignored unit."""
    for j in range(16):
        pair = (role <= 1) & (source == j)
        assert int(support[pair].sum()) == 1, f"pair of z{j}: kept {int(support[pair].sum())}"
    assert not support[role >= 2].any(), "a dead or ignored unit was kept"
    assert int(support.sum()) == 16


@pytest.mark.parametrize("relu", [False, True], ids=["linear-map", "relu-map"])
@pytest.mark.parametrize("cls", CLOSED_FORMS, ids=lambda c: c.name)
def test_noise_free_planted_layer_keeps_one_copy_and_drops_the_rest(cls, relu) -> None:
    x, y, role, source = noise_free_layer(relu=relu)
    est = cls(folds=5)
    prepared = est.prepare(x, y)
    for confidence in (0.95, 0.99):
        result = terc(est.start(prepared), confidence=confidence)
        assert_one_copy_each(result.support, role, source)
        tested = ~torch.isnan(result.pvalues)
        assert (result.pvalues[tested & (role == 2)] == 1.0).all()  # dead: exactly nothing


def test_the_in_sample_test_keeps_both_copies_on_the_noise_free_layer() -> None:
    """Why the held-out test exists: the F-test keeps all 32 informative units and copies."""
    x, y, role, _ = noise_free_layer()
    est = LinearEstimator(folds=0)
    result = terc(est.start(est.prepare(x, y)), confidence=0.95)
    assert int(result.support.sum()) == 32
    assert bool(result.support[role <= 1].all())


def test_the_penalty_margin_is_what_drops_the_duplicate() -> None:
    """With both copies in S, the held-out gain of one copy is a positive O(λ²) effect, the
    same in every fold (a plain t-test calls it significant); the penalty margin it is tested
    against is ≈ λw²/2, far larger. An informative unit's gain dwarfs its margin."""
    x, y, role, source = noise_free_layer()
    est = LinearEstimator(folds=5)
    state = est.start(est.prepare(x, y))
    pair = torch.nonzero((role <= 1) & (source == 3)).flatten().tolist()
    delta, margin = state.heldout.fold_terms(pair[0])
    assert (delta > 0).all() and (delta < 1e-6).all()
    assert one_sided_t_pvalue(delta) < 0.01  # what the test would say without the margin
    assert (margin > 100 * delta).all()
    assert state.heldout.pvalue(pair[0]) == 1.0
    state.remove(pair[0])  # now the other copy carries z3 alone
    delta, margin = state.heldout.fold_terms(pair[1])
    assert (delta > 0.01).all() and (margin.abs() < 1e-2 * delta).all()  # λ ~ 1e-3 × var
    assert state.heldout.pvalue(pair[1]) < 1e-4


def test_heldout_pvalues_are_conservative_when_nothing_is_informative() -> None:
    """x independent of y: the held-out t-test rejects H0 at 5 % in at most ~5 % of draws
    (fitting noise costs held-out loss, so it is conservative), yet is not degenerate."""
    pvalues = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(200, 3, 2, generator=g, dtype=F64)
        y = torch.randn(200, 3, generator=g, dtype=F64)
        est = LinearEstimator(folds=5)
        pvalues.append(est.start(est.prepare(x, y)).delta(0).pvalue)
    p = torch.tensor(pvalues)
    assert float((p < 0.05).double().mean()) <= 0.05
    assert float((p < 0.5).double().mean()) >= 0.05


# --- exactness: fold moments and held-out losses -----------------------------------------------


def layer(n: int = 403, units: int = 6, b: int = 2, q: int = 3, seed: int = 0):
    """Correlated b-feature units (unit 4 dead, unit 5 a copy of unit 0) and a noisy target
    (n, q) with a constant column; n not a multiple of 5 (uneven folds)."""
    g = torch.Generator().manual_seed(seed)
    d = units * b
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    x = (torch.randn(n, d, generator=g, dtype=F64) @ mix).view(n, units, b) * 3 + 1
    x[:, 4] = 7.0
    x[:, 5] = x[:, 0]
    y = x.reshape(n, d) @ torch.randn(d, q, generator=g, dtype=F64)
    y = y + 2 * torch.randn(n, q, generator=g, dtype=F64)
    y = torch.cat([y, torch.full((n, 1), 4.0, dtype=F64)], 1)
    return x, y


def test_fold_moments_merge_into_the_full_moments() -> None:
    x, y = layer()
    ref = second_moments(x, y)
    acc = MomentAccumulator(folds=5)
    start = 0
    for size in (1, 100, 57, 200, 45):  # uneven batches: folds follow the global row index
        acc.update(x[start : start + size], y[start : start + size])
        start += size
    streamed = acc.moments()
    for name in ("sxx", "sxy", "syy", "mean_x", "mean_y"):
        assert (getattr(streamed, name) - getattr(ref, name)).abs().max() <= 1e-10, name
    assert torch.equal(streamed.const_x, ref.const_x)
    folds = streamed.folds
    assert folds.n.tolist() == [81, 81, 81, 80, 80]
    n, mean_x, _, cxx, cxy, cyy = folds.merged(list(range(5)))
    assert n == 403
    assert (cxx / n - ref.sxx).abs().max() <= 1e-10
    assert (cxy / n - ref.sxy).abs().max() <= 1e-10
    assert (cyy / n - ref.syy.diagonal()).abs().max() <= 1e-10
    assert (mean_x - ref.mean_x).abs().max() <= 1e-10
    # the two-pass per-fold moments of prepare agree, and fold k is rows k, k + 5, ...
    direct = fold_moments(x, y, 5, ref)
    for name in ("n", "mean_x", "mean_y", "cxx", "cxy", "cyy", "min_x", "max_x"):
        assert (getattr(direct, name) - getattr(folds, name)).abs().max() <= 1e-9, name
    xk = x[3::5].reshape(-1, 12)
    assert torch.allclose(direct.mean_x[3], xk.mean(0), rtol=0, atol=1e-12)
    assert (direct.cxx[:, 8:10] == 0).all()  # the dead unit's features are exactly 0


def direct_fold_loss(x: Tensor, y: Tensor, units: list[int], k: int, ridge: float) -> tuple:
    """Held-out loss of fold k and the squared weight norm, fitting explicitly on the other
    folds' rows with torch.linalg.solve: features centred on the training mean, target
    columns (the non-constant ones) scaled by their full-data std, λ = ridge × mean variance
    of the features not constant on the training rows."""
    n, _, b = x.shape
    std = y.std(0, correction=0)
    keep = std > 0
    ys = y[:, keep] / std[keep]
    q = ys.shape[1]
    fold = torch.arange(n) % 5
    tr, ho = fold != k, fold == k
    xf = x.reshape(n, -1)
    live = xf[tr].amax(0) != xf[tr].amin(0)
    lam = ridge * float(xf[tr][:, live].var(0, correction=0).mean())
    cols = [u * b + j for u in units for j in range(b)]
    cols = [c for c in cols if live[c]]
    mu_x, mu_y = xf[tr].mean(0), ys[tr].mean(0)
    xt, yt = xf[tr][:, cols] - mu_x[cols], ys[tr] - mu_y
    n_t = xt.shape[0]
    w = torch.linalg.solve(xt.T @ xt / n_t + lam * torch.eye(len(cols), dtype=F64), xt.T @ yt / n_t)
    err = (ys[ho] - mu_y) - (xf[ho][:, cols] - mu_x[cols]) @ w
    return float((err**2).sum(1).mean()) / q, float((w**2).sum()), lam, q


@pytest.mark.parametrize("prefetch", [False, True])
def test_heldout_deltas_equal_explicit_refits_through_downdates(prefetch) -> None:
    x, y = layer()
    ridge = 1e-2
    est = LinearEstimator(ridge=ridge, folds=5)
    test = est.start(est.prepare(x, y)).heldout
    assert isinstance(test, HeldOutTest) and test.folds == 5
    kept = list(range(6))
    if prefetch:
        test.prefetch([3, 1, 0, 2, 5])
    for removed in (None, 3, 1, 4):  # successive downdates, inside and outside the block
        if removed is not None:
            test.remove(removed)
            kept.remove(removed)
        for k in range(5):
            loss, _, lam, _ = direct_fold_loss(x, y, kept, k, ridge)
            assert float(test.losses()[k]) == pytest.approx(loss, abs=1e-9)
            assert float(test.ridges[k]) == pytest.approx(lam, rel=1e-10)
        for i in kept:
            delta, margin = test.fold_terms(i)
            without = [u for u in kept if u != i]
            for k in range(5):
                loss, norm, lam, q = direct_fold_loss(x, y, kept, k, ridge)
                loss_wo, norm_wo, _, _ = direct_fold_loss(x, y, without, k, ridge)
                assert float(delta[k]) == pytest.approx(loss_wo - loss, abs=1e-8)
                assert float(margin[k]) == pytest.approx(lam * (norm_wo - norm) / q, abs=1e-8)


def test_gaussian_uses_the_same_heldout_test_as_linear() -> None:
    x, y = layer()
    lin, gau = LinearEstimator(folds=5), GaussianEstimator(folds=5)
    a, b = lin.start(lin.prepare(x, y)), gau.start(gau.prepare(x, y))
    for i in (0, 1, 3):
        da, db = a.delta(i), b.delta(i)
        assert da.pvalue == pytest.approx(db.pvalue, rel=1e-9, abs=1e-300)
        assert db.value == GaussianEstimator().start(gau.prepare(x, y)).delta(i).value


# --- what folds change and what they must not --------------------------------------------------


@pytest.mark.parametrize("cls", CLOSED_FORMS, ids=lambda c: c.name)
def test_folds_zero_reproduces_the_in_sample_pvalues_exactly(cls) -> None:
    x, y = layer()
    with_folds = cls(folds=5).prepare(x, y)
    plain = cls().prepare(x, y)
    assert with_folds.folds is not None and plain.folds is None
    old, zero, held = cls().start(plain), cls(folds=0).start(with_folds), cls().start(with_folds)
    assert old.heldout is None and zero.heldout is None and held.heldout is not None
    for i in (0, 2, 1):
        d_old, d_zero, d_held = old.delta(i), zero.delta(i), held.delta(i)
        assert d_zero == d_old  # bit for bit
        assert (d_held.value, d_held.relative) == (d_old.value, d_old.relative)
        for state in (old, zero, held):
            state.remove(i)


@pytest.mark.parametrize("cls", CLOSED_FORMS, ids=lambda c: c.name)
def test_threshold_mode_is_identical_with_and_without_folds(cls) -> None:
    x, y, _, _ = noise_free_layer(n=1000, relu=True)
    a, b = cls(folds=5), cls()
    ra = terc(a.start(a.prepare(x, y)), threshold=1e-3)
    rb = terc(b.start(b.prepare(x, y)), threshold=1e-3)
    assert torch.equal(ra.support, rb.support)
    assert torch.allclose(ra.deltas, rb.deltas, rtol=0, atol=0, equal_nan=True)  # bit for bit
    assert torch.allclose(ra.relative_deltas, rb.relative_deltas, rtol=0, atol=0, equal_nan=True)
    assert ra.info_kept == rb.info_kept


def test_wide_layer_heldout_test_needs_no_more_samples_than_features() -> None:
    """D = 80 features, n = 60 samples: the in-sample F-test cannot run, the ridge-based
    held-out test can; it keeps the 8 (equally strong) units the target is made of and drops
    most of the 72 noise units."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(60, 8, generator=g, dtype=F64)
    x = torch.cat([z, torch.randn(60, 72, generator=g, dtype=F64)], 1)
    w = torch.randn(8, 4, generator=g, dtype=F64)
    y = z @ (w / w.norm(dim=1, keepdim=True))
    est = LinearEstimator(folds=5)
    prepared = est.prepare(x, y)
    assert math.isnan(LinearEstimator(folds=0).start(prepared).delta(0).pvalue)  # no F-test
    result = terc(est.start(prepared), confidence=0.95)
    assert bool(result.support[:8].all())
    assert int(result.support[8:].sum()) <= 5


# --- options and refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, -1, 2.5, True, "5"])
def test_bad_folds_are_refused_by_name(bad) -> None:
    for make in (
        lambda: LinearEstimator(folds=bad),
        lambda: GaussianEstimator(folds=bad),
        lambda: MomentAccumulator(folds=bad),
    ):
        with pytest.raises(ValueError, match=r"folds must be None, 0 or an integer >= 2, got"):
            make()


def test_folds_need_two_rows_each_and_matching_counts() -> None:
    x, y = layer(n=9)
    with pytest.raises(ValueError, match="5 folds need at least 10 samples, got 9"):
        LinearEstimator(folds=5).prepare(x, y)
    acc = MomentAccumulator(folds=5)
    acc.update(x, y)
    with pytest.raises(ValueError, match="5 folds need at least 10 samples, got 9"):
        acc.moments()
    x, y = layer(n=40)
    with pytest.raises(ValueError, match="carry 5 folds but the estimator was built with folds=4"):
        LinearEstimator(folds=4).start(LinearEstimator(folds=5).prepare(x, y))
    assert LinearEstimator(folds=5).min_samples(3, 2) == 10
    assert LinearEstimator().min_samples(30, 2) == LinearEstimator(folds=5).min_samples(30, 2)
    assert GaussianEstimator(folds=5).min_samples(30, 4) == 36


def test_which_estimators_ask_for_folds_in_confidence_mode() -> None:
    assert DEFAULT_FOLDS == 5
    assert LinearEstimator().confidence_folds() == 5
    assert GaussianEstimator(folds=3).confidence_folds() == 3
    assert LinearEstimator(folds=0).confidence_folds() == 0
    # mlp has its own held-out repeats and ksg stays in-sample: no folds, none asked for
    assert MLPEstimator().confidence_folds() == 0 and KSGEstimator().confidence_folds() == 0
    for cls in (MLPEstimator, KSGEstimator):
        with pytest.raises(TypeError, match="folds"):
            cls(folds=5)
    assert repr(LinearEstimator()) == "LinearEstimator(ridge=0.001)"
    assert repr(LinearEstimator(folds=5).with_folds(0)) == "LinearEstimator(ridge=0.001, folds=0)"


# --- MIPPSelector and MIPP ---------------------------------------------------------------------


def test_selector_confidence_mode_uses_the_heldout_test_by_default() -> None:
    x, y, role, source = noise_free_layer(n=2000)
    selector = MIPPSelector().fit(x, y)  # confidence 0.95, linear, 5 folds
    assert_one_copy_each(selector.support_, role, source)
    explicit = MIPPSelector(estimator=LinearEstimator(folds=5), confidence=0.95).fit(x, y)
    assert torch.equal(explicit.support_, selector.support_)
    in_sample = MIPPSelector(estimator=LinearEstimator(folds=0)).fit(x, y)
    assert int(in_sample.support_.sum()) == 32
    # threshold mode: no folds, the same answer whatever the estimator's folds option
    a = MIPPSelector(estimator=LinearEstimator(folds=5), threshold=1e-3).fit(x, y)
    b = MIPPSelector(threshold=1e-3).fit(x, y)
    assert torch.equal(a.support_, b.support_)
    assert torch.allclose(a.deltas_, b.deltas_, rtol=0, atol=0, equal_nan=True)


def _spy_on_folds(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = targets_module.MomentAccumulator

    def recording(*args, **kwargs):
        seen.append(kwargs.get("folds", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(targets_module, "MomentAccumulator", recording)
    return seen


def tiny_duplicated_mlp() -> torch.nn.Module:
    """A 16 → 8 → 6 → 3 MLP whose hidden units 4..7 copy units 0..3 (fc1)."""
    with seeded(0):
        net = models.create("mlp", in_channels=1, input_size=4, widths=(8, 6), num_classes=3)
    with torch.no_grad():
        net.fc1.weight[4:] = net.fc1.weight[:4]
        net.fc1.bias[4:] = net.fc1.bias[:4]
    return net


@pytest.mark.parametrize("estimator", ["linear", "gaussian"])
def test_mipp_confidence_mode_accumulates_folds_and_drops_duplicates(monkeypatch, estimator):
    seen = _spy_on_folds(monkeypatch)
    net = tiny_duplicated_mlp()
    x = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    result = mipp.prune(net, x, method=MIPP(estimator=estimator, confidence=0.95))
    assert seen and all(k == DEFAULT_FOLDS for k in seen)
    report = result.report
    assert report.options["confidence"] == 0.95
    fc1 = {g.name: g for g in report.groups}["fc1"]
    assert all(len(set(fc1.kept) & {j, j + 4}) == 1 for j in range(4))
    assert all(g.width_after >= 1 for g in report.groups)
    assert all(0.0 <= p <= 1.0 for g in report.groups for p in g.pvalues if p == p)


def test_mipp_threshold_and_target_modes_accumulate_no_folds(monkeypatch) -> None:
    seen = _spy_on_folds(monkeypatch)
    net = tiny_duplicated_mlp()
    x = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mipp.prune(net, x, method=MIPP(estimator=LinearEstimator(folds=5), threshold=1e-3))
    mipp.prune(net, x, sparsity=0.3)
    assert seen and all(k == 0 for k in seen)


def test_a_layer_wider_than_the_samples_gives_delta_but_no_test():
    """n < D: the ridge keeps Δ_i finite (threshold / target modes), the F-test has no
    degrees of freedom left, so the p-value is NaN and confidence mode refuses by name."""
    from mipp.estimators import LinearEstimator
    from mipp.methods.selection import terc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 40, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.ones(3, 2, dtype=torch.float64)
    est = LinearEstimator(folds=0)
    d = est.start(est.prepare(x, y)).delta(0)
    assert math.isfinite(d.value) and d.value > 0 and math.isnan(d.pvalue)
    kept = terc(est.start(est.prepare(x, y)), threshold=1e-3).support
    assert kept[:3].all()
    with pytest.raises(ValueError, match="confidence mode needs a p-value"):
        terc(est.start(est.prepare(x, y)), confidence=0.9)
